"""The judges behind the label and realism metrics: cache keys, augmentations, and (integration)
their accuracy on the real MNIST / MNIST-M test digits of ../shared/datasets/mnist2mnistm."""

import os

import pytest
import torch
from tiny import tiny_model

from pipeline import data, judges
from pipeline import evaluation as ev

TESTS = os.path.dirname(__file__)
DATASETS = os.environ.get("TRANSMUTE_DATASETS", os.path.join(TESTS, "..", "..", "shared", "datasets"))


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist2mnistm(tmp_path_factory):
    """The whole mnist2mnistm set at 32 px (as the recipes classify it): train and test tensors."""
    dst = str(tmp_path_factory.mktemp("m2m_full"))
    data.ingest(os.path.join(DATASETS, "mnist2mnistm"), dst, progress=False)
    out = {}
    for split in ("train", "test"):
        reader = data.LocalReader(data.ReadSpec(dst, split, 4000, load_size=32, flip=False))
        batch = next(iter(reader))  # one batch holds a whole split; b (fewer images) is cut below
        n_b = reader.counts["b"]
        out[split] = {k: v[:n_b] if k.endswith("b") else v for k, v in batch.items()}
    return out


def test_recipe_key_changes_with_the_recipe_and_the_version(monkeypatch):
    key = judges.recipe_key(judges.DIGIT_RECIPE)
    assert key == judges.recipe_key(dict(reversed(judges.DIGIT_RECIPE.items())))  # order does not matter
    assert key != judges.recipe_key({**judges.DIGIT_RECIPE, "epochs": 7})
    assert key != judges.recipe_key({**judges.DIGIT_RECIPE, "augment": False})
    monkeypatch.setattr(judges, "JUDGE_VERSION", judges.JUDGE_VERSION + 1)
    assert key != judges.recipe_key(judges.DIGIT_RECIPE)  # new training code, new judges


def test_evaluator_cache_file_follows_the_recipe(tmp_path):
    """A changed recipe trains a new judge file beside the old one instead of loading it."""

    spec, cfg, _nets, _ = tiny_model("cogan", channels_a=1, channels_b=3)
    root = tmp_path / "src"
    for folder, step in {"trainA": 200, "trainB": 100, "testA": 100, "testB": 50}.items():
        src = os.path.join(DATASETS, "mnist2mnistm", folder)
        os.makedirs(root / folder)
        names = sorted(os.listdir(src))[::step]
        for name in names:
            (root / folder / name).write_bytes(open(os.path.join(src, name), "rb").read())
        with open(os.path.join(DATASETS, "mnist2mnistm", f"labels_{folder}.csv")) as f:
            lines = f.read().splitlines()
        rows = [line for line in lines[1:] if line.split(",")[0] in set(names)]
        (root / f"labels_{folder}.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    dst = str(tmp_path / "ingested")
    data.ingest(str(root), dst, progress=False)
    cache, fast = str(tmp_path / "cache"), {"epochs": 1, "min_steps": 2, "width": 4}
    first = ev.Evaluator(spec, cfg, ev.EvalOptions(dst, cache_dir=cache, classifier=fast, pairs=8), "test")
    same = ev.Evaluator(spec, cfg, ev.EvalOptions(dst, cache_dir=cache, classifier=fast, pairs=8), "test")
    options = ev.EvalOptions(dst, cache_dir=cache, classifier={**fast, "lr": 1e-3}, pairs=8)
    other = ev.Evaluator(spec, cfg, options, "test")
    assert same.classifier_files == first.classifier_files
    assert sum(": loaded " in note for note in same.notes) == 2
    assert all(other.classifier_files[d] != first.classifier_files[d] for d in "ab")
    assert not any(": loaded " in note for note in other.notes)
    assert judges.recipe_key(other.classifier_recipe("b")) in other.classifier_files["b"]
    assert other.classifier_recipe("b")["colour"] and not other.classifier_recipe("a")["colour"]


def test_augmentations_keep_shape_and_range():
    g = torch.Generator().manual_seed(0)
    gray, colour = rand(6, 1, 32, 32), rand(6, 3, 32, 32)
    assert judges.random_affine(gray, g).shape == gray.shape
    jittered = judges.colour_jitter(colour, g)
    assert jittered.shape == colour.shape and jittered.abs().max() <= 1
    tinted = judges.tint(gray, g)
    assert tinted.shape == (6, 3, 32, 32) and tinted.abs().max() <= 1
    assert not torch.equal(tinted[:, 0], tinted[:, 1])  # colour, not gray repeated three times


def test_predict_uses_eval_mode():
    """Batch norm judges must not use batch statistics: one image alone is classified as in a batch."""
    net = judges.DigitClassifier(1, 32, width=4).train()
    x = rand(8, 1, 32, 32)
    assert torch.equal(judges.predict(net, x[:1]), judges.predict(net, x)[:1])
    assert not net.training


@pytest.mark.integration
def test_mnist_judge_reads_real_test_digits(mnist2mnistm):
    """The default recipe on the 3600 MNIST training digits: >= 0.97 on the 1000 test digits."""
    train, test = mnist2mnistm["train"], mnist2mnistm["test"]
    net = judges.train_classifier(train["a"], train["label_a"], judges.DIGIT_RECIPE)
    assert judges.accuracy(net, test["a"], test["label_a"]) >= 0.97  # 0.984 when written


@pytest.mark.integration
def test_realism_judge_rejects_tinted_mnist_and_accepts_mnistm(mnist2mnistm):
    train, test = mnist2mnistm["train"], mnist2mnistm["test"]
    net = judges.train_realism_judge(train["b"], train["a"], judges.REALISM_RECIPE)
    tinted = judges.tint(test["a"], torch.Generator().manual_seed(123))  # not the training tints
    assert judges.realism(net, tinted) < 0.2
    assert judges.realism(net, test["a"].expand(-1, 3, -1, -1)) < 0.2  # plain gray repeated
    assert judges.realism(net, test["b"]) > 0.9
