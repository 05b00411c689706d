"""The file MLflow runs to load a logged generator (its `python_model`, "models from code"): it
hands MLflow the model object, the one side effect, kept out of `served_generator.py` so that
importing that module changes nothing. Shipped beside `served_generator.py`, whose folder MLflow
puts on sys.path."""

import mlflow

try:
    from served_generator import ServedGenerator
except ModuleNotFoundError:  # run from the project rather than from a logged model
    from pipeline.served_generator import ServedGenerator

mlflow.models.set_model(ServedGenerator())
