"""The error types that mean "bad input" (shown as one line, exit 2) rather than a bug (traceback)."""
from ich.checkpoint import CheckpointError
from ich.ingest import IngestError
from ich.models import ModelError


class ConfigError(ValueError):
    """A sweep/training configuration that cannot run; names the option and the problem."""


USER_ERRORS = (CheckpointError, IngestError, ModelError, ConfigError, FileNotFoundError, FloatingPointError)
