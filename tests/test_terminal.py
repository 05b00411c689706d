"""What the jobs print: a progress line while training, the test metrics beside their floors, the
search's warning when its trials tied, Ray's and MLflow's noise off unless -v, and a next step."""

import io
import logging
import os

import pandas as pd
import pytest

from jobs import train as train_job
from pipeline import launch, search
from pipeline.registry import load_generator
from pipeline.terminal import Progress, metrics_table, search_warnings

LOSSES = {"loss/G/gan_ab": 1.0, "loss/G/total": 3.0, "loss/D/a": 0.25, "loss/D/b": 0.75}


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_prints_step_rate_losses_and_eta_at_most_every_period_off_a_terminal():
    out, clock = io.StringIO(), Clock()
    progress = Progress(stream=out, clock_fn=clock)
    progress.start(0)
    for step in range(1, 11):
        clock.t += 2.0  # 2 s a step, 4 images a step
        progress.update(step, 10, LOSSES, 4)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # the first step, one 15 s later, the last
    assert lines[0] == "step 1/10  img/s ?  G 3.000  D 1.000  elapsed 0:02  ETA ?"  # the first step: no rate
    assert lines[1] == "step 9/10  2.0 img/s  G 3.000  D 1.000  elapsed 0:18  ETA 0:02"
    assert lines[-1].startswith("step 10/10  2.0 img/s") and lines[-1].endswith("ETA 0:00")


def test_progress_rewrites_one_line_on_a_terminal_and_counts_a_budget():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out, clock = Tty(), Clock()
    progress = Progress(budget_s=600.0, origin=clock.t - 60, stream=out, clock_fn=clock)
    progress.start(0)
    for step in (1, 2, 3):
        clock.t += 1.0
        progress.update(step, None, LOSSES, 2)  # the budget has not fixed the steps yet
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "\rstep 3  1:03 of 10:00 budget  2.0 img/s  G 3.000  D 1.000  ETA 8:57" in text


def test_metrics_table_puts_each_test_metric_beside_its_floor_and_ceiling():
    table = metrics_table({"test/psnr_ba": 12.0, "baseline/psnr_ba": 10.0, "test/l1_ba": 0.5,
                           "baseline/l1_ba": 0.4, "ceiling/pixel_acc_ab": 1.0, "test/pixel_acc_ab": 0.3,
                           "eval/psnr_ba": 99.0})
    lines = table.splitlines()
    assert lines[0].split() == ["test", "metric", "value", "floor", "ceiling", "vs", "floor"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows == {"test/l1_ba": ["0.5", "0.4", "-", "NOT", "above"],  # lower is better: 0.5 loses
                    "test/pixel_acc_ab": ["0.3", "-", "1"], "test/psnr_ba": ["12", "10", "-", "above"]}
    assert metrics_table({"eval/psnr_ba": 1.0}) == ""


def test_search_warns_when_every_trial_tied_or_the_best_is_below_its_floor():
    tied = search_warnings([0.1397, 0.1397, 0.1397], "eval/pixel_acc_ab", "max", 0.05)
    assert tied == [tied[0]] and tied[0].startswith(
        "warning: the search did not discriminate: every trial's eval/pixel_acc_ab is 0.1397 (3 trials)")
    low = search_warnings([0.2, 0.3], "eval/l1_ab", "min", 0.1)
    assert len(low) == 1 and "the best eval/l1_ab 0.2 does not beat its floor 0.1" in low[0]
    assert search_warnings([0.2, 0.3], "eval/pixel_acc_ab", "max", 0.1) == []


def test_tune_reads_each_trials_best_and_the_floor_it_reported():
    frames = [pd.DataFrame({"eval/psnr_ab": [9.0, 11.0], "floor/eval/psnr_ab": [12.0, 12.0]}),
              pd.DataFrame({"eval/psnr_ab": [11.0, None], "floor/eval/psnr_ab": [12.0, None]}),
              pd.DataFrame({"loss/G/total": [1.0]})]
    values = [search.trial_best(f, "eval/psnr_ab", "max") for f in frames]
    assert values == [11.0, 11.0, None] and search.trial_floor(frames[0], "eval/psnr_ab") == 12.0
    warnings = search_warnings(values, "eval/psnr_ab", "max", search.trial_floor(frames[0], "eval/psnr_ab"))
    assert [w.split(":")[1].strip() for w in warnings] == [
        "the search did not discriminate",
        "the best eval/psnr_ab 11 does not beat its floor 12 (floor/eval/psnr_ab"]


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_turns_ray_and_mlflow_noise_off_unless_verbose(monkeypatch, verbose):
    for key in launch.QUIET:
        monkeypatch.delenv(key, raising=False)
    launch.quiet(verbose)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # telemetry stays off either way
    noise = {k: os.environ.get(k) for k in ("RAY_DATA_DISABLE_PROGRESS_BARS", "MLFLOW_LOGGING_LEVEL",
                                            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    assert noise == ({k: None for k in noise} if verbose else
                     {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    assert launch.noisy() is verbose


def test_plain_train_prints_progress_the_metrics_table_registered_names_and_next(
        facades_small_dst, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRANSMUTE_HOME", str(tmp_path / "home"))
    sets = [f"data.path={facades_small_dst}", "train.steps=2", "eval.every=2", "checkpoint.every=2",
            "eval.max_images=4", "eval.grid_rows=1", "tracking.run_name=t", "model.ngf=4", "model.ndf=4"]
    assert train_job.main(["--recipe", "cyclegan_facades-quick", "--no-ray", "--set", *sets]) == 0
    printed = capsys.readouterr()
    out, err = printed.out, printed.err
    assert "step 1/2  " in err and "step 2/2  " in err and " img/s  G " in err and "ETA 0:00" in err
    assert "step 1/2  " not in out  # stdout keeps results only
    table = out[out.index("test metric"):]
    assert "test/pixel_acc_ab" in table and "test/psnr_ba" in table  # beside floors: a number each
    assert table.splitlines()[2].split()[2] != "-"
    assert "registered model: cyclegan_facades-quick-ab/1" in out
    assert "next: python jobs/translate.py --model cyclegan_facades-quick-ab/1" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/home/mlflow.db" in out
    uri = f"sqlite:///{tmp_path}/home/mlflow.db"
    generator, _ = load_generator("models:/cyclegan_facades-quick-ab/1", tracking_uri=uri)
    assert generator.aligned is True  # trained on a|b pairs: translate.py reads a folder's pairs' half


def test_closing_lines_never_print_a_password(tmp_path):
    from pipeline.run_config import override, resolve_paths

    settings = {"tracking.uri": "http://alice:s3cret@mlflow:5000", "tracking.register": False,
                "tracking.run_name": "r"}
    cfg = resolve_paths(override(train_job.recipe("cyclegan_facades-quick"), settings))
    text = train_job.closing(cfg, {})
    assert "s3cret" not in text and "next: mlflow ui --backend-store-uri http://mlflow:5000" in text


def test_ray_trains_per_report_info_lines_are_dropped_but_not_its_warnings_or_ours():
    from pipeline.session import ray_info_off

    def record(name, level):
        return logging.LogRecord(name, level, __file__, 1, "Reporting training result 1", None, None)

    ray_file = os.path.join("", "venv", "site-packages", "ray", "train", "v2", "execution", "context.py")
    assert not ray_info_off(record(ray_file, logging.INFO))
    assert ray_info_off(record(ray_file, logging.WARNING))
    assert ray_info_off(record("pipeline.loop", logging.INFO))
