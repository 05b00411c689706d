"""Batch translation: the plain-torch core, the job (incremental, killed and rerun, lineage) against
a real MLflow registry with a trained model, promotion, and the scheduling manifests in infra/."""

import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file
from tiny import tiny_model

from jobs import promote
from jobs import translate as translate_job
from pipeline import served_generator, translate
from pipeline.config import to_dict
from pipeline.translate import GeneratorArtifact, Job, ModelInfo, Outputs, Translator, Work

REPO = Path(__file__).resolve().parents[1]
FACADES_SMALL = REPO / "tests" / "assets" / "facades_small"
NAME = "translate-quick-ab"  # its own name: other modules register on the same server


# ============================================================================= helpers


def tiny_payload(name, seed=0, size=32, **overrides) -> GeneratorArtifact:
    torch.manual_seed(seed)
    spec, cfg, nets, _ = tiny_model(name, **overrides)
    direction = spec.directions[0]
    return GeneratorArtifact.from_net(name, cfg, direction, nets[spec.generator_for[direction]], size, False)


def tiny_info(generator: GeneratorArtifact) -> ModelInfo:
    key = translate.weights_key(generator.weights)
    return ModelInfo(f"tiny-{generator.model_name}", None, None, "test", key)


def model_dir(path: Path, generator: GeneratorArtifact) -> str:
    """A logged-generator directory as the code before the artifact recorded its image size and
    swap_ab wrote it (what load_generator reads), without MLflow: such models must keep loading."""
    path.mkdir(parents=True)
    spec = {"model": generator.model_name, "config": to_dict(generator.config),
            "direction": generator.direction, "net": generator.net_name}
    (path / "generator.json").write_text(json.dumps(spec))
    save_file(generator.weights, str(path / "generator.safetensors"))
    return str(path)


def photo_folder(root: Path, n: int = 32, size=None) -> Path:
    """Left halves (photos) of the facades sample at assorted sizes, a few in a subfolder, one gray."""
    root.mkdir(parents=True)
    sources = sorted(FACADES_SMALL.glob("*/*.jpg"))[:n]
    for i, src in enumerate(sources):
        img = Image.open(src)
        photo = img.crop((0, 0, img.width // 2, img.height))
        photo = photo.resize(size or (40 + 4 * (i % 8), 36 + 6 * (i % 5)))
        folder = root / "more" if i % 4 == 3 else root
        folder.mkdir(exist_ok=True)
        (photo.convert("L") if i == 5 else photo).save(folder / f"{i:02d}.jpg", quality=92)
    return root


def outputs_on_disk(root: Path) -> set[str]:
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(("_", "."))]
    return {str(p.relative_to(root)) for p in files}


def run_cli(*args) -> int:
    return translate_job.main([*map(str, args), "--no-progress"])


# ============================================================================= fixtures


@pytest.fixture(scope="module")
def registered(facades_small_dst, mlflow_server, tmp_path_factory):
    """A quick CycleGAN trained for 4 steps, registered as translate-quick-ab version 1."""
    from jobs import train as train_job

    home = tmp_path_factory.mktemp("translate_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSMUTE_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        sets = [f"data.path={facades_small_dst}", "train.steps=4", "eval.every=0", "checkpoint.every=4",
                "eval.max_images=8", f"tracking.uri={mlflow_server.uri}", "tracking.run_name=translate-me",
                "tracking.registered_name=translate-quick"]
        assert train_job.main(["--recipe", "cyclegan_facades-quick", "--no-ray", "--set", *sets]) == 0
    version = MlflowClient(mlflow_server.uri).get_model_version(NAME, "1")
    return {"uri": mlflow_server.uri, "run_id": version.run_id, "runs": home / "runs" / "translate-me"}


@pytest.fixture
def tracking_env(registered, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    return registered


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = photo_folder(tmp_path_factory.mktemp("photos") / "in")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


# ============================================================================= the plain-torch core


def test_core_restores_sizes_and_converts_channels():
    payload = tiny_payload("cyclegan", channels_a=1, channels_b=3, lambda_identity=0.0)
    core = Translator(payload)
    wide, square = np.zeros((50, 70, 1), np.uint8), np.full((32, 32, 1), 200, np.uint8)
    out = core.translate([wide, square])
    assert [o.shape for o in out] == [(50, 70, 3), (32, 32, 3)] and out[0].dtype == np.uint8
    assert [o.shape for o in core.translate([wide], keep_size=False)] == [(32, 32, 3)]
    assert core.in_channels == 1 and core.out_channels == 3


def test_train_bn_mode_differs_from_eval_and_restores_flags_and_statistics():
    payload = tiny_payload("dualgan", norm="batch", use_dropout=False)
    core = Translator(payload, bn_mode="train")
    before = {k: v.clone() for k, v in core.net.state_dict().items()}
    x = [np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in range(4)]
    train_out = core.translate(x)
    assert not any(m.training for m in core.net.modules())
    assert all(torch.equal(before[k], v) for k, v in core.net.state_dict().items())
    eval_out = Translator(payload, bn_mode="eval").translate(x)
    assert np.abs(train_out[0].astype(int) - eval_out[0]).mean() > 0.5


def test_auto_bn_mode_translates_batch_norm_per_image_and_others_in_eval_mode():
    x = [np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in range(4)]
    payload = tiny_payload("dualgan", norm="batch", use_dropout=False)
    core = Translator(payload)
    assert core.mode == "per_image"
    batched = core.translate(x)
    # each output is image i translated alone in training mode: the papers' test at batch 1
    alone = [Translator(payload, bn_mode="train").translate([p])[0] for p in x]
    assert all(np.array_equal(b, a) for b, a in zip(batched, alone, strict=True))
    assert np.array_equal(core.translate(x[2:3])[0], batched[2])
    assert np.abs(batched[0].astype(int) - Translator(payload, bn_mode="eval").translate(x)[0]).mean() > 0.5
    # the served model serves the same, whatever else is in its batch
    served = served_generator.generate(payload, core.net, core.to_tensor(x))
    np.testing.assert_array_equal(core.to_pixels(served), np.stack(batched))
    assert not any(m.training for m in core.net.modules())
    renorm = Translator(tiny_payload("dualgan", norm="batch_renorm", use_dropout=False))
    assert renorm.mode == "eval" and Translator(tiny_payload("cogan")).mode == "eval"


def test_no_ray_job_translates_a_batch_norm_model_per_image(tmp_path):
    payload = tiny_payload("pix2pix", norm="batch", use_dropout=False)
    model = model_dir(tmp_path / "model", payload)
    inputs = photo_folder(tmp_path / "in", n=3)
    out = tmp_path / "out"
    assert run_cli("--model", model, "--size", 32, "--input", inputs, "--output", out, "--no-ray") == 0
    manifest = translate.load_output_index(str(out))
    assert {e["bn_mode"] for e in manifest["entries"].values()} == {"per_image"}
    alone = Translator(replace(payload, size=32), bn_mode="train")  # batch norm on one image at a time
    for entry in manifest["entries"].values():
        pixels = translate.decode_input((inputs / entry["input_id"]).read_bytes(), 3)
        with Image.open(out / entry["file"]) as img:
            np.testing.assert_array_equal(np.asarray(img), alone.translate([pixels])[0])


def test_bicyclegan_z_seeds_reproduce_with_the_served_model():
    payload = tiny_payload("bicyclegan")
    core = Translator(payload)
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    z, seed, _ = translate.latent(core.cfg.nz, "random", 7, "abc", 2, 4)
    assert seed == translate.z_seed(7, "abc", 2) and seed != translate.z_seed(7, "abc", 3)
    tensor = core.to_tensor([x])
    served = served_generator.generate(payload, core.net, tensor, z_seed=seed)
    np.testing.assert_array_equal(core.to_pixels(served)[0], core.translate([x], z)[0])
    grid = [translate.latent(core.cfg.nz, "linear", 0, "abc", k, 3) for k in range(3)]
    assert [t for _, _, t in grid] == [0.0, 0.5, 1.0] and len({s for _, s, _ in grid}) == 1
    torch.testing.assert_close(grid[1][0], (grid[0][0] + grid[2][0]) / 2)


# ============================================================================= the job without MLflow


def test_bicyclegan_samples_per_input_with_recorded_z(tmp_path):
    model = model_dir(tmp_path / "model", tiny_payload("bicyclegan"))
    inputs = photo_folder(tmp_path / "in", n=3)
    out = tmp_path / "out"
    assert run_cli("--model", model, "--size", 32, "--input", inputs, "--output", out, "--samples", 3,
                   "--no-ray") == 0
    entries = translate.load_output_index(str(out))["entries"]
    assert sorted(e["file"] for e in entries.values()) == sorted(
        f"{i:02d}_s{k}.png" for i in range(3) for k in range(3))
    assert len({e["z_seed"] for e in entries.values()}) == 9
    assert all(k == f"{e['input_sha256']}/{e['sample']}" for k, e in entries.items())
    assert run_cli("--model", model, "--size", 32, "--input", inputs, "--output", out, "--samples", 4,
                   "--no-ray") == 0  # one more sample per input: only those are made
    runs = translate.load_output_index(str(out))["runs"]
    assert runs[-1]["counts"]["translated"] == 3 and runs[-1]["counts"]["done_before"] == 9


def test_cogan_generates_numbered_pairs_incrementally(tmp_path):
    model = model_dir(tmp_path / "model", tiny_payload("cogan", channels_a=1, channels_b=3))
    out = tmp_path / "out"
    assert run_cli("--model", model, "--pairs", 3, "--output", out, "--no-ray") == 0
    assert run_cli("--model", model, "--pairs", 5, "--output", out, "--no-ray") == 0
    manifest = translate.load_output_index(str(out))
    assert sorted(outputs_on_disk(out)) == [f"pair-{i:06d}.png" for i in range(5)]
    assert manifest["runs"][-1]["counts"]["translated"] == 2
    with Image.open(out / "pair-000004.png") as img:
        assert img.size == (64, 32) and img.mode == "RGB"  # a | b side by side, gray a made RGB


def test_new_weights_redo_the_folder_and_strays_are_cleaned(tmp_path):
    inputs = photo_folder(tmp_path / "in", n=4)
    out = tmp_path / "out"
    first = model_dir(tmp_path / "m1", tiny_payload("cyclegan", seed=1))
    second = model_dir(tmp_path / "m2", tiny_payload("cyclegan", seed=2))
    args = ["--size", 32, "--input", inputs, "--output", out, "--no-ray"]
    assert run_cli("--model", first, *args) == 0
    (out / "stray.png").write_bytes(b"left by a killed run")
    (out / "more").mkdir(exist_ok=True)
    (out / "more" / ".03.png.tmp-0123abcd").write_bytes(b"half")
    (out / "README.txt").write_text("kept: not an output")
    assert run_cli("--model", first, *args) == 0
    assert not (out / "stray.png").exists() and not (out / "more" / ".03.png.tmp-0123abcd").exists()
    assert (out / "README.txt").exists()
    assert run_cli("--model", second, *args) == 0
    manifest = translate.load_output_index(str(out))
    assert manifest["runs"][-1]["counts"]["translated"] == 4
    assert {e["model_key"] for e in manifest["entries"].values()} == {manifest["model"]["key"]}
    assert run_cli("--model", second, *args, "--overwrite") == 0
    assert translate.load_output_index(str(out))["runs"][-1]["counts"]["translated"] == 4
    back = tmp_path / "back"  # an output folder is itself an input folder (its manifest is ignored)
    assert run_cli("--model", first, "--size", 32, "--input", out, "--output", back, "--no-ray") == 0
    assert outputs_on_disk(back) == outputs_on_disk(out) - {"README.txt"}


def test_aligned_dataset_rerun_translates_nothing(tmp_path, facades_small_dst):
    """A rerun over aligned a|b rows skips every output: the half the model reads is part of the
    job's key, so the key the manifest is filtered by must already hold it."""
    model = model_dir(tmp_path / "model", tiny_payload("cyclegan"))
    out = tmp_path / "out"
    args = ["--model", model, "--size", 32, "--input", facades_small_dst, "--split", "test", "--output", out,
            "--no-ray"]
    assert run_cli(*args) == 0
    first = {f: (out / f).read_bytes() for f in outputs_on_disk(out)}
    assert len(first) == 8 and translate.load_output_index(str(out))["runs"][-1]["counts"]["translated"] == 8
    assert run_cli(*args) == 0
    manifest = translate.load_output_index(str(out))
    assert manifest["runs"][-1]["counts"]["translated"] == 0
    assert manifest["runs"][-1]["counts"]["done_before"] == 8
    assert {f: (out / f).read_bytes() for f in outputs_on_disk(out)} == first
    assert {e["input_part"] for e in manifest["entries"].values()} == {"left"}
    assert {e["job_key"] for e in manifest["entries"].values()} == {manifest["job_key"]}


def test_rerun_over_an_output_folder_from_before_the_artifact_skips_everything(tmp_path, facades_small_dst):
    """tests/assets/translation_before_artifact: a model folder and its translation of the aligned
    test split as the code before GeneratorArtifact wrote them; the job's key must not change."""
    old = REPO / "tests" / "assets" / "translation_before_artifact"
    out = tmp_path / "out"
    shutil.copytree(old / "out", out)
    before = {f: (out / f).read_bytes() for f in outputs_on_disk(out)}
    args = ["--model", old / "model", "--size", 32, "--input", facades_small_dst, "--split", "test",
            "--output", out, "--no-ray", "--no-keep-size"]
    assert run_cli(*args) == 0
    manifest = translate.load_output_index(str(out))
    assert manifest["runs"][-1]["counts"]["translated"] == 0
    assert manifest["runs"][-1]["counts"]["done_before"] == 8
    assert {f: (out / f).read_bytes() for f in outputs_on_disk(out)} == before


@pytest.mark.integration
def test_s3_folder_in_and_out_incrementally(s3_env, tmp_path):
    """Inputs and outputs on a real S3-compatible server; the second run adds only the new image."""
    from pipeline import storage

    bucket = s3_env.make_bucket("t-translate")
    model = model_dir(tmp_path / "model", tiny_payload("cyclegan"))
    local = photo_folder(tmp_path / "in", n=3)
    for path in sorted(local.rglob("*.jpg"))[:2]:
        storage.write_bytes(f"{bucket}/in/{path.relative_to(local)}", path.read_bytes())
    args = ["--model", model, "--size", 32, "--input", f"{bucket}/in", "--output", f"{bucket}/out",
            "--no-ray"]
    assert run_cli(*args) == 0
    storage.write_bytes(f"{bucket}/out/.x.png.tmp-0123abcd", b"a killed run's temp object")
    storage.write_bytes(f"{bucket}/in/02.jpg", (local / "02.jpg").read_bytes())
    assert run_cli(*args) == 0
    manifest = translate.load_output_index(f"{bucket}/out")
    assert manifest["runs"][-1]["counts"]["translated"] == 1
    files = {e["file"] for e in manifest["entries"].values()}
    assert files == {"00.png", "01.png", "02.png"}
    assert set(storage.list_files(f"{bucket}/out")) == files | {"_manifest.json", translate.RUN_FILE}


def test_a_second_run_on_the_folder_stops_the_first(tmp_path):
    payload = tiny_payload("cyclegan")
    work = Work(Job(payload, tiny_info(payload), str(tmp_path / "out")))
    first, second = Outputs(work.job.output), Outputs(work.job.output)
    first.open(work, {})
    second.open(work, {})
    with pytest.raises(translate.OutputError, match="took over"):
        first.commit()


def test_foreign_output_folder_is_refused(tmp_path, capsys):
    model = model_dir(tmp_path / "model", tiny_payload("cyclegan"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "holiday.jpg").write_bytes(b"someone's photo")
    assert run_cli("--model", model, "--size", 32, "--input", FACADES_SMALL / "test", "--half", "a",
                   "--output", tmp_path / "out", "--no-ray") == 2
    assert "no _manifest.json" in capsys.readouterr().err


# ============================================================================= registry, Ray, kill and rerun


@pytest.mark.integration
def test_registered_model_translates_a_folder_twice_on_ray(tracking_env, photos, ray_cluster, tmp_path,
                                                           capsys):
    out = tmp_path / "out"
    args = ["--model", f"{NAME}/1", "--input", photos, "--output", out, "--ray", "--actors", 2,
            "--batch-size", 4]
    assert run_cli(*args) == 0
    manifest = translate.load_output_index(str(out))
    entries = manifest["entries"]
    expected = {str(p.relative_to(photos).with_suffix(".png")) for p in photos.rglob("*.jpg")}
    expected.discard("broken.png")
    assert outputs_on_disk(out) == expected == {e["file"] for e in entries.values()}
    assert manifest["runs"][-1]["rejected"][0]["input_id"] == "broken.jpg"
    assert "rejected broken.jpg" in capsys.readouterr().err
    entry = next(e for e in entries.values() if e["input_id"] == "more/03.jpg")
    sha = hashlib.sha256((photos / "more" / "03.jpg").read_bytes()).hexdigest()
    assert entry["input_sha256"] == sha and f"{sha}/0" in entries
    assert (entry["model"], entry["model_version"], entry["run_id"], entry["direction"]) == (
        NAME, "1", tracking_env["run_id"], "ab")
    with Image.open(out / "more" / "03.png") as img, Image.open(photos / "more" / "03.jpg") as src:
        assert img.size == src.size and json.loads(img.text["transmute"])["input_sha256"] == sha
    mtimes = {f: (out / f).stat().st_mtime_ns for f in expected}

    assert run_cli(*args) == 0  # nothing new: nothing translated, nothing rewritten
    again = translate.load_output_index(str(out))
    assert again["entries"] == entries and again["runs"][-1]["counts"]["translated"] == 0
    assert again["runs"][-1]["counts"]["done_before"] == len(expected)
    assert {f: (out / f).stat().st_mtime_ns for f in outputs_on_disk(out)} == mtimes


@pytest.mark.integration
def test_killed_run_completes_with_exactly_one_output_per_input(tracking_env, tmp_path):
    inputs = photo_folder(tmp_path / "in", size=(384, 384))
    out = tmp_path / "out"
    args = ["--model", f"models:/{NAME}/1", "--input", str(inputs), "--output", str(out), "--no-ray",
            "--batch-size", "1", "--commit-every", "0", "--no-progress"]
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "translate.py"), *args],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listed = 0
    deadline = time.monotonic() + 120
    while listed < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            listed = len(translate.load_output_index(str(out))["entries"])
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    assert job.poll() is None, f"the job ended before it could be killed: {job.stderr.read()[-2000:]}"
    os.kill(job.pid, signal.SIGKILL)
    job.wait(10)
    job.stderr.close()
    listed = len(translate.load_output_index(str(out))["entries"])
    assert 2 <= listed < 32

    assert run_cli(*args[:-1]) == 0
    manifest = translate.load_output_index(str(out))
    files = [e["file"] for e in manifest["entries"].values()]
    assert len(files) == len(set(files)) == 32 and set(files) == outputs_on_disk(out)
    assert sorted(e["input_id"] for e in manifest["entries"].values()) == sorted(
        str(p.relative_to(inputs)) for p in inputs.rglob("*.jpg"))
    assert manifest["runs"][-1]["counts"]["done_before"] == listed


@pytest.mark.integration
def test_dataset_half_and_checkpoint_into_parquet(tracking_env, facades_small_dst, tmp_path):
    """A training checkpoint (its ba generator) over the aligned test split: the right halves."""
    out = tmp_path / "out"
    assert run_cli("--model", tracking_env["runs"], "--direction", "ba", "--input", facades_small_dst,
                   "--split", "test", "--output", out, "--format", "parquet", "--no-ray") == 0
    table = translate.read_parquet_outputs(str(out))
    assert table.num_rows == 8 and set(table["input_part"].to_pylist()) == {"right"}
    assert set(table["width"].to_pylist()) == {256} and set(table["model_version"].to_pylist()) == {
        "checkpoint_00000004"}
    assert set(table["run_id"].to_pylist()) == {tracking_env["run_id"]}
    payload, _ = translate.load_model(str(tracking_env["runs"]), direction="ba")
    row = table.slice(0, 1).to_pylist()[0]
    with Image.open(FACADES_SMALL / row["input_id"].split("/", 1)[1]) as img:  # id: <split>/<path>
        right = np.asarray(img.convert("RGB"))[:, img.width // 2:]
    expected = Translator(payload).translate([right])[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), expected)


@pytest.mark.integration
def test_promotion_gates_production_and_jobs_translate_with_it(tracking_env, tmp_path, capsys):
    inputs = photo_folder(tmp_path / "in", n=2)
    job = ["--model", f"{NAME}@production", "--input", inputs, "--output", tmp_path / "out", "--no-ray"]
    assert run_cli(*job) == 2
    assert "has no alias 'production'" in capsys.readouterr().err
    assert promote.main([NAME, "--metric", "test/psnr_ab", "--min", "1000"]) == 4
    assert "below --min 1000" in capsys.readouterr().err
    assert promote.main([NAME, "--metric", "test/not_logged", "--max", "1"]) == 4
    client = MlflowClient(tracking_env["uri"])
    assert "production" not in client.get_registered_model(NAME).aliases
    assert promote.main([NAME, "--version", "1", "--metric", "test/psnr_ab", "--min", "1",
                         "--metric", "test/l1_ab", "--max", "2"]) == 0
    assert client.get_model_version_by_alias(NAME, "production").version == "1"
    tag = json.loads(client.get_model_version(NAME, "1").tags[promote.PROMOTION_TAG])
    assert tag["alias"] == "production" and tag["values"]["test/psnr_ab"] > 1
    assert run_cli(*job) == 0
    entries = translate.load_output_index(str(tmp_path / "out"))["entries"].values()
    assert {(e["model_version"], e["model_uri"]) for e in entries} == {("1", f"models:/{NAME}@production")}


@pytest.mark.integration
def test_errors_name_the_model_the_input_and_what_to_do(tracking_env, photos, tmp_path, capsys):
    assert run_cli("--model", "no_such_model@production", "--input", photos, "--output", tmp_path / "o") == 2
    assert "no registered model 'no_such_model'" in capsys.readouterr().err
    assert run_cli("--model", f"{NAME}/7", "--input", photos, "--output", tmp_path / "o") == 2
    assert "has no version '7'" in capsys.readouterr().err
    assert run_cli("--model", f"{NAME}/1", "--input", tmp_path / "nowhere", "--output", tmp_path / "o",
                   "--no-ray") == 2
    assert "nowhere is not a folder of images" in capsys.readouterr().err
    assert run_cli("--model", f"{NAME}/1", "--direction", "ba", "--input", photos, "--output",
                   tmp_path / "o", "--no-ray") == 2
    assert "translates 'ab'" in capsys.readouterr().err


@pytest.mark.integration
def test_strict_and_nothing_translatable_exit_non_zero(tracking_env, photos, tmp_path):
    assert run_cli("--model", f"{NAME}/1", "--input", photos, "--output", tmp_path / "a", "--no-ray",
                   "--strict") == 4
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert run_cli("--model", f"{NAME}/1", "--input", broken, "--output", tmp_path / "b", "--no-ray") == 4
    assert run_cli("--model", f"{NAME}/1", "--input", broken, "--output", tmp_path / "b", "--no-ray") == 0


# ============================================================================= infra/


def infra(name):
    return list(yaml.safe_load_all((REPO / "infra" / name).read_text()))


def check_rayjob_spec(spec: dict) -> None:
    """The fields KubeRay needs, and a translate command line that this repo's parser accepts."""
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["image"] and container["name"]
    assert all(g["groupName"] and g["replicas"] >= 1 for g in cluster["workerGroupSpecs"])
    check_translate_command(spec["entrypoint"])


def check_translate_command(line: str) -> None:
    words = shlex.split(line)
    script = next(w for w in words if w.endswith(".py"))
    assert (REPO / script.removeprefix("/app/")).is_file(), script
    args = translate_job.parse_args(words[words.index(script) + 1:])
    assert args.model.startswith("models:/") and args.model.endswith("@production")
    assert args.input and args.output


def test_infra_rayjob_manifest():
    (job,) = infra("translate-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["generateName"] and job["metadata"]["labels"]["transmute.io/job"]
    check_rayjob_spec(job["spec"])


def test_infra_raycronjob_manifest():
    (cron,) = infra("translate-raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    check_rayjob_spec(cron["spec"]["jobTemplate"])


def test_infra_cronjob_creates_the_rayjob():
    docs = {d["kind"]: d for d in infra("translate-cronjob.yaml")}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert "kubectl create -f /manifests/rayjob.yaml" in pod["containers"][0]["args"][0]
    assert {"create", "list"} <= set(docs["Role"]["rules"][0]["verbs"])
    assert docs["Role"]["rules"][0]["resources"] == ["rayjobs"]
    (job,) = infra("translate-rayjob.yaml")  # what the ConfigMap mounted at /manifests holds
    assert cron["metadata"]["labels"]["transmute.io/job"] == job["metadata"]["labels"]["transmute.io/job"]


def test_infra_crontab_line():
    text = (REPO / "infra" / "crontab").read_text()
    (line,) = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    fields = line.split(None, 5)
    assert len(fields) == 6 and "ray job submit" in fields[5] and "--working-dir ." in fields[5]
    command = fields[5].split(" -- ", 1)[1].split(">>")[0]
    check_translate_command(command)
