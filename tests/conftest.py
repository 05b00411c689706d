from fixtures_data import *  # noqa: F401,F403
from mlflow_server import *  # noqa: F401,F403
