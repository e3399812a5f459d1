"""The served soup as MLflow Models-from-Code: this file is the pyfunc model's `python_model` (`CODE_FILE`).

`SoupClassifier` loads the soup checkpoint folder from the model's artifacts (model.safetensors +
checkpoint.json) and classifies images; output: one row per image with `class` (name), `confidence` and
`probabilities` (class order). `ich serve` writes the pyfunc folder around a verified soup record on the serving
machine (soups/serve/pyfunc_folder.py's save_pyfunc): MLflow copies this installed file into it (no pickle is
written).
Versions registered before that carry a copy logged with them; `soups.serve.verify.verify_soup_model` checks that
such a copy is byte for byte this installed file; `mlflow models serve` (through `ich serve`) then runs only it, and
it takes its input checks from the installed `soups` package. `ich predict` never runs a model folder's copy: it
builds SoupClassifier from this installed module (soups/serve/verify.py's load_soup_model). Importing this module
also calls `set_model` (MLflow's global for Models-from-Code), as importing soups/served_model.py did.
No `from __future__` import: a statement planted before it would be a SyntaxError, and tests/test_attacks.py's
code-swap control shows a planted copy of this file running under MLflow's own loader.
"""
import traceback
import warnings
from pathlib import Path

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
import numpy as np
import pandas as pd

from soups.serve.inputs import InputPolicy, RequestRefused, request_images

ARTIFACT = "soup"  # name of the checkpoint folder among the pyfunc model's artifacts
CODE_FILE = Path(__file__).resolve()  # the model's python_model (Models-from-Code): this file


class SoupClassifier(mlflow.pyfunc.PythonModel):
    """Loads the soup checkpoint folder from the model's artifacts and classifies images."""
    _skip_type_hint_validation = True  # the explicit signature() checks inputs; no type-hint wrapper

    def load_context(self, context) -> None:
        import torch

        from ich.checkpoint import load_checkpoint
        from ich.models import model_for_checkpoint
        from ich.preprocess import Preprocess

        self.policy = InputPolicy.from_env()  # the server's environment decides what `path` may read
        state_dict, meta = load_checkpoint(context.artifacts[ARTIFACT])  # bounded, typed metadata; safetensors only
        self.classes = list(meta.class_names)
        self.preprocess = Preprocess.from_meta(meta)  # what training evaluated with (ich/preprocess.py)
        self.model = model_for_checkpoint(state_dict, meta, context.artifacts[ARTIFACT])  # misfit: one line
        self.torch = torch

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            images = request_images(frame, self.policy)
            probs = self.probabilities(images)
        except ValueError as e:  # refused, or an image that fails to decode: a 400 with the one line
            raise RequestRefused(str(e)).as_mlflow() from None
        except Exception as e:  # ours to debug, not the client's to read: the trace goes to the server's log only
            traceback.print_exc()
            raise MlflowException(f"internal error ({type(e).__name__}); see the server's log") from None
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        return pd.DataFrame({
            "class": [self.classes[k] for k in top],
            "confidence": [float(probs[i, k]) for i, k in enumerate(top)],
            "probabilities": [row.tolist() for row in probs],
        })

    def probabilities(self, images: list[tuple[bytes, str]]) -> np.ndarray:
        """Checked image bytes -> (N, classes) probabilities: the one decode + preprocess + forward step."""
        return self.softmax(self.logits(images))

    def logits(self, images: list[tuple[bytes, str]]) -> np.ndarray:
        """Checked image bytes -> (N, classes) float32 logits (`ich predict --json` prints both from one pass)."""
        from PIL import Image

        from ich.preprocess import image_logits

        if not images:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with warnings.catch_warnings():  # the header was checked; a decoder that still warns is refused
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return image_logits(self.model, self.preprocess, images)  # ich.preprocess: the one path

    def softmax(self, logits: np.ndarray) -> np.ndarray:
        return self.torch.softmax(self.torch.from_numpy(logits), dim=1).numpy().astype(np.float64)


def signature():
    """Both input columns optional (one per row is enough); list-of-floats probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.string, "path", required=False),
                     ColSpec(DataType.string, "image", required=False)])
    outputs = Schema([ColSpec(DataType.string, "class"), ColSpec(DataType.double, "confidence"),
                      ColSpec(Array(DataType.double), "probabilities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


set_model(SoupClassifier())
