"""The MLflow UI as a user sees a search, in a real browser: `mlflow server` on 127.0.0.1 (the
session's server, tests/mlflow_server.py) after a tiny real search (tests/search_fixture.py), pages
loaded in headless Chromium (Debian's `chromium`, which .ci/run installs). Each page is rendered
once: its DOM is checked and its screenshot kept under $TRANSMUTE_TEST_ARTIFACTS (default
/tmp/transmute-test-artifacts/mlflow_ui).

The MLflow 3 UI opens in its GenAI mode; `workflowType=machine_learning` in the page's query opens
the classic "Model training" views (runs, parameters, metrics, the compare page)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from search_fixture import METRIC

from pipeline.tracking import runs_under

pytestmark = pytest.mark.integration

CLASSIC = "workflowType=machine_learning"


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("TRANSMUTE_TEST_ARTIFACTS", "/tmp/transmute-test-artifacts")) / "mlflow_ui"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nMLflow UI screenshots: {folder}")
    return folder


def render(url: str, screenshot: Path, budget_ms: int = 15000) -> str:
    """The page's DOM after `budget_ms` of virtual time (its API calls answered, charts drawn),
    and its screenshot at `screenshot`."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "no chromium: apt-get install -y chromium (.ci/run does)"
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--window-size=1600,1400", f"--virtual-time-budget={budget_ms}",
            f"--screenshot={screenshot}", "--dump-dom", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and screenshot.stat().st_size > 0, done.stderr[-2000:]
    return done.stdout


def trials(search):
    client = MlflowClient(search.uri)
    parent = client.search_runs([client.get_experiment_by_name("transmute").experiment_id],
                                f"tags.`tune.search` = '{search.name}' and tags.`tune.role` = 'parent'")[0]
    return parent, runs_under(search.uri, parent.info.run_id)


def test_compare_page_plots_the_searched_key_against_the_objective(tiny_search, shots):
    parent, children = trials(tiny_search)
    ids = json.dumps([c.info.run_id for c in children])
    url = (f"{tiny_search.uri}/#/compare-runs?runs={ids}&experiments=[\"{parent.info.experiment_id}\"]"
           f"&{CLASSIC}")
    dom = render(url, shots / "compare.png")
    axes = re.findall(r'class="axis-title"[^>]*data-unformatted="([^"]*)"', dom)
    assert "optim.lr" in axes and axes[-1] == "objective", axes  # the default metric: the objective
    assert "lr=2e-4 norm=batch" in dom and "lr=0.001 norm=batch" in dom  # trials named by their values


def test_run_page_shows_searched_values_objective_and_dataset(tiny_search, shots):
    parent, children = trials(tiny_search)
    run = children[0]
    dom = render(f"{tiny_search.uri}/#/experiments/{parent.info.experiment_id}/runs/{run.info.run_id}"
                 f"?{CLASSIC}", shots / "run.png")
    assert run.info.run_name in dom and "optim.lr" in dom and "model.norm" in dom
    assert ">objective<" in dom and METRIC in dom
    assert run.inputs.dataset_inputs[0].dataset.digest in dom  # the Datasets section


def test_run_artifacts_page_shows_a_sample_grid(tiny_search, shots):
    parent, children = trials(tiny_search)
    run = children[0]
    sample = "samples/step0000004_ab.png"
    dom = render(f"{tiny_search.uri}/#/experiments/{parent.info.experiment_id}/runs/{run.info.run_id}"
                 f"/artifacts/{sample}?{CLASSIC}", shots / "sample.png")
    assert re.search(rf'<img[^>]*alt="{re.escape(sample)}"[^>]*src="blob:', dom), "no sample image shown"
