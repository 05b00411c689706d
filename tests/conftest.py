import pytest
import torch

from pipeline import launch

launch.quiet()  # telemetry off before any test imports mlflow (the entry points do the same)

from fixtures_data import *  # noqa: E402,F401,F403
from mlflow_server import *  # noqa: E402,F401,F403
from search_fixture import *  # noqa: E402,F401,F403


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine two threads per process
    spin waiting for each other (measured: classifier training 1-2 s on one thread, 8-17 s on two).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
