"""A tiny real search logged to the session's MLflow server, shared by tests/test_tune.py (what it
logs) and tests/test_mlflow_ui.py (how the MLflow UI shows it); tests/conftest.py imports it, so
one pytest session runs the search once.
"""

import dataclasses

import pytest

__all__ = ["tiny_search"]

SPACE = ["optim.lr=grid:1e-3,2e-4", "model.norm=grid:batch", "model.lambda_a=200"]
METRIC = "eval/cycle_l1_a"


@dataclasses.dataclass
class Search:
    uri: str
    name: str
    storage: str
    summary: dict


@pytest.fixture(scope="session")
def tiny_search(facades_small_dst, mlflow_server, ray_cluster, tmp_path_factory) -> Search:
    """Two trials (two learning rates, one norm, a constant λ_A), 4 steps, a report every 2."""
    root = tmp_path_factory.mktemp("tiny_search")
    name, storage = "tiny-ui-search", str(root / "tune")
    args = [
        "--recipe", "dualgan_facades-quick", "--name", name, "--storage", storage,
        "--max-steps", "4", "--eval-every", "2", "--cpus-per-trial", "0.5",
        "--scheduler", "fifo", "--num-samples", "1", "--metric", METRIC, "--space", *SPACE,
        "--set", f"data.path={facades_small_dst}", "eval.max_images=8", f"tracking.uri={mlflow_server.uri}",
        "train.log_every=1",
    ]
    from jobs import tune as tune_job  # here: conftest imports this module for every test

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSMUTE_HOME", str(root / "home"))
        summary = tune_job.run(tune_job.parse_args(args))
    return Search(mlflow_server.uri, name, storage, summary)
