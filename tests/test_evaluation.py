"""Evaluation metrics and the Evaluator, on hand-made cases and on real data (the facades sample in
tests/assets, a few hundred MNIST / MNIST-M digits from ../shared/datasets), with tiny models."""

import glob
import math
import os
import shutil
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_model

from models.norms import per_image
from pipeline import data
from pipeline import evaluation as ev

TESTS = os.path.dirname(__file__)
FACADES_SMALL = os.path.join(TESTS, "assets", "facades_small")
DATASETS = os.environ.get("TRANSMUTE_DATASETS", os.path.join(TESTS, "..", "..", "shared", "datasets"))
FAST_CLASSIFIER = {"epochs": 1, "min_steps": 30, "width": 8}
FAST_REALISM = {"steps": 20, "width": 4}
# torch 2.13 marks TorchScript deprecated, but the reference Inception files are TorchScript
TORCHSCRIPT = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def facades(tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("facades36"))
    data.ingest(FACADES_SMALL, dst, data.IngestOptions(load_size=36), progress=False)
    return dst


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A small mnist2mnistm copy: every 20th MNIST / 10th MNIST-M file and their labels."""
    src, root = os.path.join(DATASETS, "mnist2mnistm"), tmp_path_factory.mktemp("m2m")
    for folder, step in {"trainA": 20, "trainB": 10, "testA": 20, "testB": 10}.items():
        names = sorted(os.listdir(os.path.join(src, folder)))[::step]
        os.makedirs(root / folder)
        for name in names:
            shutil.copy(os.path.join(src, folder, name), root / folder / name)
        with open(os.path.join(src, f"labels_{folder}.csv")) as f:
            lines = f.read().splitlines()
        keep = set(names)
        rows = [line for line in lines[1:] if line.split(",")[0] in keep]
        (root / f"labels_{folder}.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    dst = str(tmp_path_factory.mktemp("m2m_ingested"))
    data.ingest(str(root), dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def digit_eval(digits, tmp_path_factory):
    """A CycleGAN MNIST (1 channel) ↔ MNIST-M (3 channels) evaluator; trains and caches classifiers."""
    spec, cfg, nets, _ = tiny_model("cyclegan", channels_a=1, channels_b=3)
    cache = str(tmp_path_factory.mktemp("classifier_cache"))
    options = ev.EvalOptions(digits, size=32, cache_dir=cache, classifier=FAST_CLASSIFIER,
                             realism=FAST_REALISM)  # fmt: skip
    evaluator = ev.Evaluator(spec, cfg, options, "test")
    return evaluator, nets, cache


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def finite(values):
    return all(math.isfinite(v) for v in values.values())


# ----------------------------------------------------------------------------- image metrics


def test_l1_and_psnr_known_values():
    x, y = torch.zeros(2, 3, 16, 16), torch.full((2, 3, 16, 16), 0.5)
    assert ev.l1(x, y) == pytest.approx(0.5)
    assert ev.psnr(x, y) == pytest.approx(10 * math.log10(1 / 0.25**2))  # 0.5 vs 0.75 on [0, 1]
    # per image, then the mean: one perfect image does not make the batch perfect
    z = torch.stack([y[0], x[1]])
    assert ev.psnr(x, z) == pytest.approx((100 + 12.0412) / 2, abs=1e-3)


def test_ssim_identical_constant_and_one_window_by_hand():
    x = rand(2, 3, 24, 24)
    assert ev.ssim(x, x) == pytest.approx(1.0)
    # constant images: only the luminance term is left, (2 m1 m2 + C1) / (m1² + m2² + C1)
    a, b = torch.full((1, 1, 16, 16), -0.6), torch.full((1, 1, 16, 16), 0.2)  # 0.2 and 0.6 on [0, 1]
    c1 = 0.01**2
    assert ev.ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel=1e-6)
    # an 11×11 image has exactly one window: Wang et al.'s weighted statistics, written out
    p, q = rand(1, 1, 11, 11, seed=1), rand(1, 1, 11, 11, seed=2)
    u, v = ((p + 1) / 2).double().numpy()[0, 0], ((q + 1) / 2).double().numpy()[0, 0]
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu, mv = (w * u).sum(), (w * v).sum()
    vu, vv, cov = (w * (u - mu) ** 2).sum(), (w * (v - mv) ** 2).sum(), (w * (u - mu) * (v - mv)).sum()
    c2 = 0.03**2
    expected = (2 * mu * mv + c1) * (2 * cov + c2) / ((mu**2 + mv**2 + c1) * (vu + vv + c2))
    assert ev.ssim(p, q) == pytest.approx(expected, rel=1e-6)
    assert ev.ssim(x, x + 0.1 * rand(2, 3, 24, 24, seed=3)) > ev.ssim(x, x + 0.5 * rand(2, 3, 24, 24, seed=3))


def test_diversity_is_mean_pairwise_l1():
    zero, one = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert ev.diversity([zero, one, one]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        ev.diversity([zero])


# ----------------------------------------------------------------------------- label maps


def test_segmentation_scores_on_a_constructed_case():
    true = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 3]])  # class 3 only predicted, never true
    s = ev.segmentation_scores(pred, true, 4)
    assert s["pixel_acc"] == pytest.approx(5 / 8)
    assert s["class_acc"] == pytest.approx((3 / 4 + 2 / 2 + 0 / 2) / 3)  # classes in the truth
    iou = [3 / 4, 2 / 4, 0 / 2, 0 / 1]  # classes in the truth or the prediction
    assert s["class_iou"] == pytest.approx(sum(iou) / 4)


def test_all_class_means_count_an_absent_class_as_zero():
    """The reference's get_scores averages over every class; a fifth class that appears nowhere
    lowers those means and leaves the present-class means alone."""
    true = torch.tensor([[0, 0, 0, 0], [1, 1, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 1], [1, 1, 1, 3]])
    four, five = ev.segmentation_scores(pred, true, 4), ev.segmentation_scores(pred, true, 5)
    assert five["class_acc"] == pytest.approx(four["class_acc"])
    assert five["class_iou"] == pytest.approx(four["class_iou"])
    acc = [3 / 4, 2 / 2, 0 / 2]  # classes 3 and 4 are never true: they add 0
    iou = [3 / 4, 2 / 4, 0 / 2, 0 / 1]  # class 4 is in neither map: it adds 0
    assert four["class_acc_all"] == pytest.approx(sum(acc) / 4)
    assert five["class_acc_all"] == pytest.approx(sum(acc) / 5)
    assert four["class_iou_all"] == pytest.approx(sum(iou) / 4)
    assert five["class_iou_all"] == pytest.approx(sum(iou) / 5)
    assert five["class_acc_all"] < five["class_acc"] and five["class_iou_all"] < five["class_iou"]


def test_palette_from_real_facades_labels():
    files = sorted(glob.glob(os.path.join(FACADES_SMALL, "train", "*.jpg")))
    labels = np.stack([np.asarray(Image.open(f).convert("RGB"))[:, 256:] for f in files])  # B = label map
    palette = ev.derive_palette(labels, 12)
    assert palette.shape == (12, 3)
    gaps = torch.cdist(palette, palette) + 1e9 * torch.eye(12)
    assert gaps.min() > 40, palette  # twelve clearly different colours, not JPEG noise
    assert torch.equal(ev.derive_palette(labels, 12), palette)  # deterministic
    truth = ev.snap_to_palette(labels[:3], palette)
    assert truth.shape == (3, 256, 256) and truth.dtype == torch.int64
    assert ev.segmentation_scores(truth, truth, 12)["pixel_acc"] == 1.0
    assert len(truth.unique()) >= 6  # a facade has several classes, not one blob
    # the palette explains the labels: most pixels lie close to their snapped colour
    error = np.linalg.norm(labels[:3].reshape(-1, 3) - palette.numpy()[truth.flatten()], axis=1)
    assert np.median(error) < 15, np.median(error)
    # the same images as float tensors in [-1, 1] snap to the same classes
    tensors = torch.from_numpy(labels[:3]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (ev.snap_to_palette(tensors, palette) == truth).float().mean() > 0.999


# ----------------------------------------------------------------------------- classifiers


def test_digit_classifier_learns_mnist_quickly():
    with np.load(os.path.join(DATASETS, "digits", "mnist_5k.npz")) as npz:
        order = np.random.default_rng(0).permutation(len(npz["y"]))
        x = torch.from_numpy(npz["x"][order]).float()[:, None] / 127.5 - 1
        y = torch.from_numpy(npz["y"][order])
    net = ev.train_classifier(x[:1000], y[:1000], {"epochs": 2, "min_steps": 60, "width": 16, "seed": 0})
    assert ev.accuracy(net, x[4000:], y[4000:]) > 0.8  # 0.85 when written
    assert not net.training


def test_class_entropy_is_one_for_even_classes_and_zero_for_one():
    class Fixed(torch.nn.Module):  # "classifies" an image by its first pixel
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # predict() reads the device off one

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()

    even = torch.arange(10.0).repeat(5).view(50, 1, 1, 1)
    assert ev.class_entropy(Fixed(), even) == pytest.approx(1.0)
    assert ev.class_entropy(Fixed(), torch.full((50, 1, 1, 1), 3.0)) == pytest.approx(0.0)


def test_pair_agreement_counts_matching_classes():
    x = rand(32, 1, 28, 28)
    net = ev.DigitClassifier(1, 28, width=4)
    assert ev.pair_agreement(net, net, x, x) == 1.0
    shuffled = x.flip(0)
    expected = (ev.predict(net, x) == ev.predict(net, shuffled)).double().mean().item()
    assert ev.pair_agreement(net, net, x, shuffled) == pytest.approx(expected)


# ----------------------------------------------------------------------------- FID and KID


def scripted_extractor(path, keyword=True):
    """A tiny random conv net standing in for the TorchScript Inception."""

    class WithKeyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.relu(self.conv(x / 255.0)).mean((2, 3))

    class Plain(WithKeyword):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x / 255.0)).mean((2, 3))

    torch.manual_seed(0)
    torch.jit.script(WithKeyword() if keyword else Plain()).save(str(path))
    return str(path)


def test_frechet_and_kernel_distances_against_references():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(60, 5)), rng.normal(0.3, 1.5, size=(50, 5))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    reference = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert ev.frechet_distance(f1, f2) == pytest.approx(reference, rel=1e-8)
    # one subset of all rows: the unbiased MMD² written out
    x, y = f1[:50], f2
    k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
    m = len(x)
    off = lambda g: (g.sum() - np.trace(g)) / (m * (m - 1))  # noqa: E731
    mmd = off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()
    assert ev.kernel_inception_distance(x, y, subsets=1, subset_size=50) == pytest.approx(mmd, rel=1e-9)


@TORCHSCRIPT
def test_fid_kid_with_a_scripted_extractor(tmp_path):
    extractor = ev.load_feature_extractor(scripted_extractor(tmp_path / "net.pt"))
    images, other = rand(64, 3, 16, 16, seed=0), rand(64, 3, 16, 16, seed=1)
    shifted = (images + 0.5).clamp(-1, 1)
    feats = ev.extract_features(extractor, images, batch_size=24)  # several batches
    assert feats.shape == (64, 6) and feats.dtype == np.float64
    same = ev.frechet_distance(feats, feats)
    fresh = ev.frechet_distance(feats, ev.extract_features(extractor, other))
    far = ev.frechet_distance(feats, ev.extract_features(extractor, shifted))
    assert abs(same) < 1e-6 * far and fresh < far
    kid_same = ev.kernel_inception_distance(feats, feats, subsets=5, subset_size=32)
    kid_far = ev.kernel_inception_distance(feats, ev.extract_features(extractor, shifted), 5, 32)
    assert kid_same < 0.1 * kid_far and kid_far > 0
    # grey images are given as RGB; an extractor without return_features is called plainly
    plain = ev.load_feature_extractor(scripted_extractor(tmp_path / "plain.pt", keyword=False))
    assert np.allclose(ev.extract_features(plain, images), feats)
    assert ev.extract_features(extractor, images[:, :1]).shape == (64, 6)
    with pytest.raises(FileNotFoundError):
        ev.load_feature_extractor(str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------- the Evaluator


def test_evaluator_on_facades_with_a_tiny_cyclegan(facades):
    spec, cfg, nets, _ = tiny_model("cyclegan")
    nets.train()
    nets["D_a"].eval()
    flags = [m.training for m in nets.modules()]
    evaluator = ev.Evaluator(spec, cfg, ev.EvalOptions(facades, size=32, num_classes=12), "test")
    metrics, baselines = evaluator.metrics(nets), evaluator.baselines()
    grids = evaluator.grids(nets, n=3)
    assert [m.training for m in nets.modules()] == flags
    scores = [f"{k}_{d}" for d in ("ab", "ba") for k in ("l1", "psnr", "ssim")]
    label_scores = ("pixel_acc", "class_acc", "class_iou", "class_acc_all", "class_iou_all")
    scores += [f"{k}_ab" for k in label_scores]  # photo → labels only
    assert set(metrics) == {f"eval/{k}" for k in scores} | {"eval/cycle_l1_a", "eval/cycle_l1_b"}
    assert set(baselines) == {f"baseline/{k}" for k in scores}
    assert finite(metrics) and finite(baselines)
    assert all(0 <= metrics[f"eval/{k}_ab"] <= 1 for k in label_scores)
    assert grids["ab"].shape == (3, 3 * 34 + 2, 3 * 34 + 2) and set(grids) == {"ab", "ba"}
    assert any("FID/KID skipped" in note and "inception_path" in note for note in evaluator.notes)
    # the baseline is the mean training label map, scored against the test label maps
    train = [b["b"] for b in data.LocalReader(data.ReadSpec(facades, "train", 8, load_size=32, flip=False))]
    test = next(iter(data.LocalReader(data.ReadSpec(facades, "test", 8, load_size=32, flip=False))))["b"]
    mean = torch.cat(train).mean(0, keepdim=True).expand_as(test)
    assert baselines["baseline/psnr_ab"] == pytest.approx(ev.psnr(mean, test), rel=1e-5)
    assert evaluator.metrics(nets) == metrics  # eval mode: deterministic


def test_batch_norm_is_evaluated_per_image_and_modes_leave_the_statistics(facades):
    spec, cfg, nets, _ = tiny_model("dualgan", norm="batch", use_dropout=False)
    nets.train()
    with torch.no_grad():  # running statistics away from their initial 0 and 1
        spec.translate(cfg, nets, torch.rand(4, 3, 32, 32) * 2 - 1, "ab")
    state = {k: v.clone() for k, v in nets.state_dict().items()}
    evaluator = ev.Evaluator(spec, cfg, ev.EvalOptions(facades, size=32, label_domain=""), "test")
    assert evaluator.mode == "per_image"
    served, running, train = (evaluator.metrics(nets, mode) for mode in (None, "eval", "train"))
    # the default is the per-image function's output: each image alone, its own statistics
    x, y = evaluator.data["a"], evaluator.data["b"]
    alone = per_image(lambda xi, _: spec.translate(cfg, nets, xi, "ab"), x)  # train mode at batch 1
    nets.load_state_dict(state)
    assert served["eval/l1_ab"] == ev.l1(alone, y) and len(x) > 1
    assert abs(served["eval/l1_ab"] - running["eval/l1_ab"]) > 1e-4
    assert train["eval/l1_ab"] != served["eval/l1_ab"]
    assert evaluator.metrics(nets) == served
    grid = evaluator.grids(nets, n=2)["ab"]
    assert torch.equal(grid[:, 2:34, 36:68], alone[0])  # the grid's output column, per image too
    assert all(torch.equal(v, nets.state_dict()[k]) for k, v in state.items())
    assert all(m.training for m in nets.modules())
    assert not any(k.startswith("eval/pixel_acc") for k in served)


def test_loop_logs_per_image_and_running_statistics_for_batch_norm_only(facades):
    from pipeline.loop_eval import evaluate

    cfg = types.SimpleNamespace(eval=types.SimpleNamespace(train_mode_too=True))
    out = {}
    for norm in ("batch", "instance"):
        spec, model_cfg, nets, _ = tiny_model("pix2pix", norm=norm, use_dropout=False)
        evaluator = ev.Evaluator(spec, model_cfg, ev.EvalOptions(facades, size=32, label_domain=""), "test")
        out[norm] = evaluate(cfg, evaluator, nets, torch.device("cpu"), "test/")
        assert out[norm]["test/l1_ab"] == evaluator.metrics(nets)["eval/l1_ab"]
        assert out[norm]["test_train_mode/l1_ab"] == evaluator.metrics(nets, "train")["eval/l1_ab"]
    batch, instance = out["batch"], out["instance"]
    running = batch["test_running_stats/l1_ab"]
    assert batch["test_running_stats_gap/l1_ab"] == pytest.approx(abs(batch["test/l1_ab"] - running))
    assert batch["test_gap/l1_ab"] == pytest.approx(abs(running - batch["test_train_mode/l1_ab"]))
    assert batch["test_running_stats_gap/l1_ab"] > 1e-4
    assert not any(k.startswith("test_running_stats") for k in instance)
    assert instance["test_gap/l1_ab"] == pytest.approx(
        abs(instance["test/l1_ab"] - instance["test_train_mode/l1_ab"]))


def test_bicyclegan_uses_mean_z_and_measures_diversity(facades):
    spec, cfg, nets, _ = tiny_model("bicyclegan")
    options = ev.EvalOptions(facades, size=32, num_classes=12, diversity_samples=3)
    evaluator = ev.Evaluator(spec, cfg, options, "test")
    first, second = evaluator.metrics(nets), evaluator.metrics(nets)
    assert first == second  # z = 0 for the scores and seeded z for diversity: repeatable
    assert first["eval/diversity"] > 0 and "eval/pixel_acc_ab" in first and "eval/l1_ba" not in first
    grids = evaluator.grids(nets, n=2)
    assert grids["ab_z"].shape == (3, 2 * 34 + 2, 5 * 34 + 2)  # input | z = 0 | three random z


def test_digit_label_preservation_and_classifier_cache(digit_eval, digits, monkeypatch):
    evaluator, nets, cache = digit_eval
    metrics, baselines = evaluator.metrics(nets), evaluator.baselines()
    assert set(metrics) == {"eval/label_acc_ab", "eval/label_acc_ba", "eval/cycle_l1_a", "eval/cycle_l1_b",
                            "eval/realism_ab"}  # realism only where gray MNIST becomes colour MNIST-M
    names = {"label_acc_ab", "label_acc_ba", "realism_ab"}
    assert set(baselines) == {f"{k}/{n}" for k in ("baseline", "ceiling") for n in names}
    assert all(0 <= v <= 1 for k, v in {**metrics, **baselines}.items() if "acc" in k or "realism" in k)
    for d in "ab":  # the ceiling is the judge's accuracy on the real images, also in the notes
        label = evaluator.data[f"label_{d}"]
        expected = ev.accuracy(evaluator.classifiers[d], evaluator.data[d], label)
        assert baselines[f"ceiling/label_acc_{'ba' if d == 'a' else 'ab'}"] == expected
        note = f"classifier {d}: accuracy {expected:.4f} on {len(label)} real images of this split"
        assert note in evaluator.notes
    assert evaluator.data["a"].shape[1:] == (1, 32, 32) and evaluator.data["b"].shape[1:] == (3, 32, 32)
    files = evaluator.classifier_files
    assert sorted(files) == ["a", "b"] and all(os.path.isfile(f) for f in files.values())
    assert not [f for f in os.listdir(cache) if ".tmp-" in f]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr("pipeline.evaluation.evaluator.train_classifier", no_training)  # where it is called
    monkeypatch.setattr("pipeline.evaluation.evaluator.train_realism_judge", no_training)
    spec, cfg = evaluator.spec, evaluator.cfg
    options = ev.EvalOptions(digits, size=32, cache_dir=cache, classifier=FAST_CLASSIFIER,
                             realism=FAST_REALISM)  # fmt: skip
    again = ev.Evaluator(spec, cfg, options, "test")
    assert any(note.startswith("classifier b: loaded") for note in again.notes)
    assert any(note.startswith("realism judge ab: loaded") for note in again.notes)
    for d in "ab":
        old, new = evaluator.classifiers[d].state_dict(), again.classifiers[d].state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old)
    assert again.metrics(nets) == metrics and again.baselines() == baselines


def test_cogan_pair_agreement(digit_eval, digits):
    _, _, cache = digit_eval  # the same domains, channels and size: the classifiers come from the cache
    spec, cfg, nets, _ = tiny_model("cogan", channels_a=1, channels_b=3)
    options = ev.EvalOptions(digits, cache_dir=cache, classifier=FAST_CLASSIFIER, pairs=64)
    evaluator = ev.Evaluator(spec, cfg, options, "test")
    assert sum(note.startswith("classifier") and "loaded" in note for note in evaluator.notes) == 2
    metrics = evaluator.metrics(nets)
    assert set(metrics) == {"eval/pair_agreement", "eval/pair_class_entropy", "eval/judge_acc_a",
                            "eval/judge_acc_b"}
    assert 0 <= metrics["eval/pair_class_entropy"] <= 1
    assert 0 <= metrics["eval/pair_agreement"] <= 1
    for d in "ab":  # each judge's accuracy on the real eval images, logged beside the agreement
        truth = ev.accuracy(evaluator.classifiers[d], evaluator.data[d], evaluator.data[f"label_{d}"])
        assert metrics[f"eval/judge_acc_{d}"] == truth == evaluator.baselines()[f"ceiling/classifier_acc_{d}"]
    assert evaluator.metrics(nets) == metrics  # a fixed seeded z
    assert evaluator.mode == "eval"  # CoGAN generates from z: its batch norms use running statistics
    x_a, x_b = evaluator._generate_pairs(nets, 64, "eval")
    cls_a, cls_b = evaluator.classifiers["a"], evaluator.classifiers["b"]
    assert metrics["eval/pair_agreement"] == ev.pair_agreement(cls_a, cls_b, x_a, x_b)
    assert set(evaluator.baselines()) == {"ceiling/classifier_acc_a", "ceiling/classifier_acc_b"}
    assert evaluator.grids(nets, n=2)["pair"].shape == (3, 2 * 34 + 2, 2 * 34 + 2)


@TORCHSCRIPT
def test_evaluator_reports_fid_and_kid_with_an_extractor(facades, tmp_path):
    spec, cfg, nets, _ = tiny_model("pix2pix")
    path = scripted_extractor(tmp_path / "inception.pt")
    options = ev.EvalOptions(facades, size=32, label_domain="", inception_path=path)
    evaluator = ev.Evaluator(spec, cfg, options, "test")
    metrics = evaluator.metrics(nets)
    assert {"eval/fid_ab", "eval/kid_ab"} <= set(metrics) and finite(metrics)
    assert metrics["eval/fid_ab"] > 0 and not any("FID" in note for note in evaluator.notes)
    options = ev.EvalOptions(facades, size=32, inception_path=str(tmp_path / "no.pt"))
    missing = ev.Evaluator(spec, cfg, options, "test")
    assert "eval/fid_ab" not in missing.metrics(nets)
    assert any("does not exist" in note for note in missing.notes)


def test_norm_study_figure_puts_train_and_eval_outputs_side_by_side():
    x, rows = rand(2, 3, 32, 32), {}
    for norm in ("batch", "batch_renorm", "instance"):
        spec, cfg, nets, _ = tiny_model("dualgan", norm=norm, use_dropout=False)
        rows[norm] = ev.train_eval_outputs(spec, cfg, nets, x)
        assert all(m.training for m in nets.modules())
    gap = {k: (t - e).abs().mean().item() for k, (t, e) in rows.items()}
    assert gap["batch"] > 1e-3 and gap["instance"] < 1e-6, gap
    figure = ev.norm_study_figure(rows, x)
    assert figure.shape == (3, 6 * 34 + 2, 3 * 34 + 2)  # three kinds × two inputs; three columns
    top = lambda row, col: figure[:, 2 + row * 34 : 34 + row * 34, 2 + col * 34 : 34 + col * 34]  # noqa: E731
    assert torch.equal(top(2, 0), x[0]) and torch.equal(top(2, 1), rows["batch_renorm"][0][0])
    assert torch.equal(top(5, 2), rows["instance"][1][1])


def test_swap_ab_evaluates_the_right_half_as_input(facades):
    """BicycleGAN / pix2pix recipes translate label maps (stored b) to photos (stored a)."""
    spec, cfg, nets, _ = tiny_model("pix2pix")
    plain = ev.Evaluator(spec, cfg, ev.EvalOptions(facades, size=32, max_images=4, label_domain=""), "test")
    options = ev.EvalOptions(facades, size=32, max_images=4, label_domain="", swap_ab=True)
    swapped = ev.Evaluator(spec, cfg, options, "test")
    assert torch.equal(swapped.data["a"], plain.data["b"]) and torch.equal(swapped.data["b"], plain.data["a"])
    assert not torch.equal(swapped.mean_images["a"], plain.mean_images["a"])


def test_evaluator_from_config_reads_the_run_config(facades, tmp_path):
    from pipeline.run_config import make_config, override

    settings = {"data.path": facades, "data.load_size": 36, "data.crop_size": 32, "data.swap_ab": True,
                "eval.max_images": 4, "eval.label_domain": "", "eval.num_classes": 2, "train.seed": 7}
    cfg = override(make_config("pix2pix"), settings)
    cfg.home = str(tmp_path)
    options = ev.EvalOptions.from_config(cfg)
    assert options == ev.EvalOptions(facades, size=32, max_images=4, label_domain="", num_classes=2,
                                     cache_dir=str(tmp_path / "cache"), seed=7, swap_ab=True)  # fmt: skip
    evaluator = ev.Evaluator.from_config(cfg, "test")
    assert evaluator.cfg is cfg.model and evaluator.spec.name == "pix2pix" and evaluator.seed == 7
    assert evaluator.swap_ab and evaluator.data["a"].shape == (4, 3, 32, 32)
