"""Batch translation of a folder of pix2pix-style pair images (width = 2 x height, A|B side by side):
the half the model was trained on, the half `--half` names, or a refusal naming `--half`; and the
output saying whether the job ran on Ray or in-process, and why."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_model

from jobs import translate as translate_job
from pipeline import cli
from pipeline.translate import GeneratorArtifact, load_output_index


def exported_model(folder, aligned) -> str:
    """A tiny CycleGAN ab generator (32 px) exported as a model folder, trained on aligned pairs or
    not (`aligned`: None for a model that does not record it)."""
    torch.manual_seed(0)
    spec, cfg, nets, _ = tiny_model("cyclegan")
    artifact = GeneratorArtifact.from_net("cyclegan", cfg, "ab", nets[spec.generator_for["ab"]], 32, False)
    return replace(artifact, aligned=aligned).export(str(folder))


def image_folder(folder, width: int, height: int, n: int = 2):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def translate(model, images, out, *extra) -> int:
    return translate_job.main(["--model", model, "--input", str(images), "--output", str(out), "--no-ray",
                               "--batch-size", "2", "--io-workers", "1", "--no-progress", *extra])


def test_pairs_refused_naming_half_when_the_model_does_not_record_its_training_layout(tmp_path, capsys):
    model = exported_model(tmp_path / "model", aligned=None)
    pairs = image_folder(tmp_path / "pairs", 64, 32)
    assert translate(model, pairs, tmp_path / "out") == cli.USAGE
    err = capsys.readouterr().err
    assert "pair images (64x32" in err and "--half a" in err and "--half b" in err


def test_half_cuts_each_pair_and_the_output_says_where_it_ran(tmp_path, capsys):
    model = exported_model(tmp_path / "model", aligned=None)
    pairs = image_folder(tmp_path / "pairs", 64, 32)
    assert translate(model, pairs, tmp_path / "out", "--half", "b") == 0
    out = capsys.readouterr().out
    assert "ran in-process: --no-ray" in out and "right half of each 64x32 pair (--half b)" in out
    assert "next: " in out
    assert Image.open(tmp_path / "out" / "0.png").size == (32, 32)  # the half, not the composite
    index = load_output_index(str(tmp_path / "out"))
    (run,) = index["runs"]
    assert run["ran"] == "in-process: --no-ray" and run["input_half"]["half"] == "right"
    assert {e["input_part"] for e in index["entries"].values()} == {"right"}


def test_a_model_trained_on_aligned_pairs_reads_its_half_by_itself(tmp_path, capsys):
    model = exported_model(tmp_path / "model", aligned=True)
    assert json.loads((tmp_path / "model" / "generator.json").read_text())["aligned"] is True
    pairs = image_folder(tmp_path / "pairs", 64, 32)
    assert translate(model, pairs, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "left half of each 64x32 pair, as the model was trained on aligned pairs" in out
    assert Image.open(tmp_path / "out" / "1.png").size == (32, 32)


@pytest.mark.parametrize("half", ["a", "whole"])
def test_square_images_are_whole_and_half_on_them_is_refused(tmp_path, capsys, half):
    model = exported_model(tmp_path / "model", aligned=True)
    squares = image_folder(tmp_path / "squares", 40, 40)
    status = translate(model, squares, tmp_path / "out", "--half", half)
    if half == "a":
        assert status == cli.USAGE and "are not pairs" in capsys.readouterr().err
    else:
        assert status == 0 and Image.open(tmp_path / "out" / "0.png").size == (40, 40)
