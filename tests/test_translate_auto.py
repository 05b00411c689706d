"""Where batch translation runs (issue 15): without --ray or --no-ray the job times its first batch in
this process and goes on Ray only above the crossover, and says which; --ray and --no-ray force it."""

import json

import numpy as np
import pytest
from PIL import Image
from test_translate import model_dir, photo_folder, run_cli, tiny_payload

from pipeline import translate
from pipeline.translate import RunOptions, runner


def test_auto_runs_a_few_images_in_process_and_says_why(tmp_path, capsys, monkeypatch):
    from jobs import translate as translate_job

    def no_ray(*args):
        raise AssertionError("auto started Ray for 3 images")

    monkeypatch.setattr(translate_job, "init_ray", no_ray)
    monkeypatch.setattr(runner.torch, "get_num_threads", lambda: 1)  # 2 actors would have more cores
    model = model_dir(tmp_path / "model", tiny_payload("cyclegan"))
    inputs = photo_folder(tmp_path / "in", n=3)
    assert run_cli("--model", model, "--size", 32, "--input", inputs, "--output", tmp_path / "out",
                   "--actors", 2) == 0
    ran = translate.load_output_index(str(tmp_path / "out"))["runs"][-1]["ran"]
    assert ran.startswith("in-process: auto, 3 images below the crossover of ")
    assert f"ran {ran};" in capsys.readouterr().out  # and Ray was never started (no_ray)


def test_crossover_grows_with_the_fixed_cost_and_needs_more_than_one_core_of_actors(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(runner.torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (2.0, 0.0, 0.0))  # half the cores busy: unloaded
    monkeypatch.setattr(runner.ray_runner, "ray_is_up", lambda: False)  # another test's Ray may be up
    two = RunOptions(mode="auto", actors=2)
    up, down = runner.crossover(0.1, two, ray_up=True), runner.crossover(0.1, two, ray_up=False)
    assert up == pytest.approx(runner.ACTOR_START_S / (0.1 * 0.5)) and down > up  # starting Ray costs too
    assert runner.choose(int(down) + 1, 0.1, two)[0]  # Ray is not up: its start counts
    assert not runner.choose(int(down) - 1, 0.1, two)[0]
    assert runner.crossover(0.1, RunOptions(mode="auto", actors=1), ray_up=True) == float("inf")
    said = runner.choose(10**6, 0.1, RunOptions(mode="auto", actors=1))
    assert not said[0] and "no faster with 1 actor on 4 cores" in said[1]
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (12.0, 0.0, 0.0))  # 3 tasks a core: 3x slower
    assert runner.crossover(0.1, two, ray_up=True) == pytest.approx(3 * up)


@pytest.mark.integration
def test_ray_forces_the_actors_and_they_make_the_same_outputs(ray_cluster, tmp_path):
    model = model_dir(tmp_path / "model", tiny_payload("cyclegan"))
    inputs = photo_folder(tmp_path / "in", n=5)
    common = ["--model", model, "--size", 32, "--input", inputs, "--batch-size", 2]
    assert run_cli(*common, "--output", tmp_path / "ray", "--ray", "--actors", 2) == 0
    assert run_cli(*common, "--output", tmp_path / "here", "--no-ray") == 0
    on_ray = translate.load_output_index(str(tmp_path / "ray"))
    assert on_ray["runs"][-1]["ran"] == "on Ray: 2 actors (--ray)"
    assert translate.load_output_index(str(tmp_path / "here"))["runs"][-1]["ran"] == "in-process: --no-ray"
    assert len(on_ray["entries"]) == 5
    here = tmp_path / "here"
    for entry in on_ray["entries"].values():
        with Image.open(tmp_path / "ray" / entry["file"]) as a, Image.open(here / entry["file"]) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert json.loads(a.text["transmute"])["input_sha256"] == entry["input_sha256"]
