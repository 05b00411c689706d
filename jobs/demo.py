"""`make demo`: the product in about five minutes on CPU, on the embedded defaults (a local Ray,
MLflow in sqlite, data on disk), all of it under demo_out/.

    python jobs/demo.py                 # what `make demo` runs
    python jobs/demo.py --train-minutes 3 --search-steps 60

1. ingest: a subset of MNIST ↔ MNIST-M digits (../shared/datasets/mnist2mnistm when present, else
   the sample committed in tests/assets/mnist2mnistm_small) and the facades sample, into Parquet;
2. train: CycleGAN MNIST ↔ MNIST-M on Ray Train for --train-minutes (the -15min recipe's settings,
   a shorter budget), tracked in MLflow, its generators registered;
3. search: jobs/tune_dualgan.py's search (ASHA, --search-trials trials, nested MLflow runs) on the
   facades sample;
4. promote: jobs/promote.py moves @production to the trained MNIST-M→MNIST generator if its test
   label accuracy beats its floor (the judge's score of the most frequent class);
5. translate: jobs/translate.py translates a folder of MNIST-M test digits through that @production
   model on Ray;
6. summary: the metrics beside their floors, where the grids and outputs are, the `mlflow ui` command.

Each phase runs the job's own main() in this process, so Ray starts once. A rerun reuses the
ingested data and the trained judges under demo_out/home and adds new runs beside the old ones.
"""

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo: its samples and demo_out
SAMPLE = os.path.join(ROOT, "tests", "assets", "mnist2mnistm_small")
FACADES = os.path.join(ROOT, "tests", "assets", "facades_small")
# per folder of the digits subset: enough for judges that read digits well, few enough for minutes
SUBSET = {"trainA": 1000, "trainB": 1000, "testA": 200, "testB": 200}
MODEL = "demo-mnist2mnistm"  # registered as MODEL-ab (MNIST→MNIST-M) and MODEL-ba
DIRECTION = "ba"  # MNIST-M→MNIST: the direction the quality table scores best (label_acc_ba)
PHASES = 6


@dataclasses.dataclass
class Settings:
    """What the demo runs; the test shrinks it (few steps, tiny widths)."""

    out: str
    train_minutes: float | None = 3.5  # None: the steps given in train_set
    # half the -15min recipe's widths: about twice the steps, which a short budget needs more
    train_set: list = dataclasses.field(
        default_factory=lambda: ["eval.max_images=100", "model.ngf=16", "model.ndf=16"])
    search_trials: int = 4
    search_steps: int = 40
    search_set: list = dataclasses.field(default_factory=list)
    subset: dict = dataclasses.field(default_factory=lambda: dict(SUBSET))
    translate_images: int = 8
    source: str = ""  # digits to take the subset from; "": digits_source()
    gate: float | None = None  # promotion bound on test/label_acc_ba; None: the metric's floor
    stamp: str = dataclasses.field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))

    @property
    def home(self) -> str:
        return os.path.join(self.out, "home")

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)


@contextmanager
def phase(number: int, title: str):
    """One line when a phase starts, one when it ends, with its wall time; on a terminal, a line
    between them that counts the seconds (the jobs' own output scrolls above it)."""
    print(f"\n[{number}/{PHASES}] {title}", flush=True)
    start, stop = time.time(), threading.Event()
    ticker = threading.Thread(target=tick, args=(number, start, stop), daemon=True)
    if sys.stdout.isatty():
        ticker.start()
    try:
        yield
    finally:
        stop.set()
    back = "\r" if sys.stdout.isatty() else ""  # over the ticker's line
    print(f"{back}[{number}/{PHASES}] done in {time.time() - start:.0f} s", flush=True)


def tick(number: int, start: float, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        print(f"\r[{number}/{PHASES}] {time.time() - start:.0f} s ", end="", flush=True)


def check(status: int, what: str) -> None:
    if status:
        raise SystemExit(f"demo: {what} exited with status {status}; see its message above")


# ----------------------------------------------------------------------------- 1. ingest


def digits_source() -> str:
    shared = os.path.join(os.environ.get("TRANSMUTE_DATASETS", os.path.join(os.path.dirname(ROOT), "shared",
                                                                            "datasets")), "mnist2mnistm")
    return shared if os.path.isdir(os.path.join(shared, "trainB")) else SAMPLE


def copy_subset(src: str, dst: str, counts: dict) -> None:
    """Up to counts[folder] files of each folder with their labels, taken evenly over the labels
    file's order (MNIST's is sorted by class: the first rows would all be zeros)."""
    for folder, n in counts.items():
        with open(os.path.join(src, f"labels_{folder}.csv")) as f:
            rows = list(csv.DictReader(f))
        picked = [rows[i * len(rows) // n] for i in range(n)] if n < len(rows) else rows
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
        for name in (r["filename"] for r in picked):
            shutil.copyfile(os.path.join(src, folder, name), os.path.join(dst, folder, name))
        with open(os.path.join(dst, f"labels_{folder}.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["filename", "label"])
            writer.writeheader()
            writer.writerows({"filename": r["filename"], "label": r["label"]} for r in picked)


def ingest(s: Settings) -> dict:
    """Both datasets into Parquet under the demo's home (once: a rerun finds them)."""
    from jobs import prepare_data

    src = s.source or digits_source()
    data = {"digits": os.path.join(s.home, "data", "mnist2mnistm-demo"),
            "facades": os.path.join(s.home, "data", "facades_small"), "digits_source": src}
    subset = s.path("source", "mnist2mnistm-demo")
    if not os.path.exists(os.path.join(data["digits"], "_manifest.json")):
        shutil.rmtree(subset, ignore_errors=True)
        copy_subset(src, subset, s.subset)
        print(f"digits: a subset of {src}: {s.subset}")
        check(prepare_data.main([subset, data["digits"], "--no-progress"]), "prepare_data.py (digits)")
    if not os.path.exists(os.path.join(data["facades"], "_manifest.json")):
        check(prepare_data.main([FACADES, data["facades"], "--no-progress"]), "prepare_data.py (facades)")
    print(f"datasets: {data['digits']}, {data['facades']}")
    return data


# ----------------------------------------------------------------------------- 2. train


def train(s: Settings, data: dict) -> dict:
    """CycleGAN MNIST ↔ MNIST-M on Ray Train for the demo's budget; the run's final metrics."""
    from jobs import train as train_job

    metrics_json = s.path(f"train-{s.stamp}.json")
    train_job.STARTED = time.time()  # the budget counts from this phase, not from the demo's start
    minutes = [] if s.train_minutes is None else ["--minutes", str(s.train_minutes)]
    argv = ["--recipe", "cyclegan_mnist2mnistm-15min", *minutes, "--metrics-json", metrics_json,
            "--set", f"data.path={data['digits']}", f"tracking.registered_name={MODEL}",
            f"tracking.run_name=demo-train-{s.stamp}", *s.train_set]
    check(train_job.main(argv), "train.py")
    with open(metrics_json) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- 3. search


def search(s: Settings, data: dict) -> dict:
    """jobs/tune_dualgan.py's search (its default space and objective) on the facades sample."""
    from jobs import tune, tune_dualgan

    argv = ["--recipe", "dualgan_facades-quick", "--num-samples", str(s.search_trials),
            "--max-steps", str(s.search_steps), "--eval-every", str(max(1, s.search_steps // 4)),
            "--scheduler", "asha", "--max-concurrent", "2", "--no-table", "--name", f"demo-search-{s.stamp}",
            "--set", f"data.path={data['facades']}", *s.search_set]
    args = tune.parse_args(argv, tune_dualgan.DEFAULTS)
    return {**tune.run(args), "name": args.name, "metric": args.metric}


# ----------------------------------------------------------------------------- 4. promote


def floor_of(metrics: dict, key: str) -> float:
    return metrics.get(key.replace("test/", "baseline/", 1), 0.0)


def promote(s: Settings, metrics: dict) -> dict:
    """The gate: @production only if the translation reads as the right digit more often than the
    floor does (or the bound given in Settings)."""
    from jobs import promote as promote_job
    from pipeline import cli

    key = f"test/label_acc_{DIRECTION}"
    bound = floor_of(metrics, key) if s.gate is None else s.gate
    name = f"{MODEL}-{DIRECTION}"
    print(f"gate: {key} >= {bound:.4f} ({'its floor' if s.gate is None else 'the given bound'}); "
          f"the model has {metrics.get(key, float('nan')):.4f}")
    status = promote_job.main([name, "--metric", key, "--min", f"{bound:.6f}"])
    if status == cli.CHECK:  # the gate did its job; the demo still shows translation, saying with what
        print(f"the gate kept @production from this model: step 5 translates with {name}'s latest version "
              "instead (train longer: --train-minutes)")
        return {"name": name, "key": key, "bound": bound, "model": name, "promoted": False}
    check(status, "promote.py (the gate)")
    return {"name": name, "key": key, "bound": bound, "model": f"{name}@production", "promoted": True}


# ----------------------------------------------------------------------------- 5. translate


def translate(s: Settings, model: str) -> dict:
    """A folder of MNIST-M test digits through `model` (MODEL-ba@production), and a side-by-side sheet."""
    from jobs import translate as translate_job
    from pipeline import demo_summary

    folder, output = s.path("translate_in"), s.path(f"translated-{s.stamp}")
    source = os.path.join(s.path("source", "mnist2mnistm-demo"), "testB")
    names = sorted(os.listdir(source))[: s.translate_images]
    os.makedirs(folder, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    check(translate_job.main(["--model", model, "--input", folder, "--output", output,
                              "--no-progress"]), "translate.py")
    sheet = demo_summary.side_by_side(folder, output, names, s.path(f"translated-{s.stamp}.png"))
    return {"input": folder, "output": output, "sheet": sheet}


# ----------------------------------------------------------------------------- the flow


def artifacts(uri: str, run_id: str) -> str:
    """The run's artifact folder on disk (the demo's store is local)."""
    from mlflow import MlflowClient

    where = MlflowClient(uri).get_run(run_id).info.artifact_uri
    return where.removeprefix("file://")


def environment(s: Settings) -> None:
    """Everything under the demo's home, Ray Data's and MLflow's download bars off."""
    from pipeline import launch

    launch.quiet()
    os.environ["TRANSMUTE_HOME"] = s.home
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the demo's sqlite store, not a server set for other work
    os.environ.pop("RAY_ADDRESS", None)  # a local Ray, started once
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def start_ray() -> None:
    """The local Ray every phase shares (the jobs' init_ray finds it running): workers' log lines
    stay in Ray's session folder (the jobs print their results from this process), Ray Data's
    progress bars off."""
    import logging

    import ray
    from ray.data import DataContext

    from pipeline.launch import local_ray_env

    if not ray.is_initialized():
        with local_ray_env():  # as the jobs' own local Ray
            ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines, on its own logger


def run(s: Settings) -> list[str]:
    environment(s)
    with phase(1, "ingest: digits and facades into Parquet"):
        data = ingest(s)
    start_ray()
    length = f"{s.train_minutes:g} min" if s.train_minutes else "a few steps"
    with phase(2, f"train: CycleGAN MNIST ↔ MNIST-M on Ray Train for {length}, tracked in MLflow"):
        trained = train(s, data)
    with phase(3, f"search: tune_dualgan.py, ASHA over {s.search_trials} trials (nested MLflow runs)"):
        searched = search(s, data)
    with phase(4, "promote: the gate on the registered MNIST-M→MNIST generator"):
        gate = promote(s, trained["metrics"])
    with phase(5, f"translate: {s.translate_images} MNIST-M digits through {gate['model']}"):
        translated = translate(s, gate["model"])
    from pipeline.demo_summary import summary
    from pipeline.launch import tracking_uri

    uri = tracking_uri(None)
    grids = os.path.join(artifacts(uri, trained["run_id"]), "test_samples")
    lines = summary(trained, searched, gate, translated, uri, grids)
    print(f"\n[{PHASES}/{PHASES}] summary\n" + "\n".join(lines), flush=True)
    return lines


def parse_args(argv=None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=os.path.join(ROOT, "demo_out"))
    p.add_argument("--train-minutes", type=float, default=3.5)
    p.add_argument("--search-trials", type=int, default=4)
    p.add_argument("--search-steps", type=int, default=40)
    a = p.parse_args(argv)
    return Settings(out=os.path.abspath(a.out), train_minutes=a.train_minutes, search_trials=a.search_trials,
                    search_steps=a.search_steps)


def main(argv=None) -> int:
    start = time.time()
    run(parse_args(argv))
    print(f"demo done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
