"""The served soup as MLflow Models-from-Code: this file is the pyfunc model's `python_model`.

MLflow copies this file into the model folder at logging time (no pickle is written). Before anything
loads a soup, `soups.pyfunc.verify_soup_model` checks that the copy is byte for byte this installed
file; `mlflow models serve` (through `ich serve`) then runs only it, and it takes the classifier from
the installed `soups` package. `ich predict` does not run it at all: it builds SoupClassifier itself.
"""
from mlflow.models import set_model

from soups.pyfunc import SoupClassifier

set_model(SoupClassifier())
