"""mmtune: fine-tune pretrained encoders on tables of multimodal examples, and ship the result."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402
from .data.manifest import BadRowsError  # noqa: E402


def fit(*args, **kwargs):
    """See :func:`mmtune.training.fit.fit`."""
    from .training.fit import fit as _fit

    return _fit(*args, **kwargs)


def load(run_dir, device: str = "cpu"):
    """Load a run bundle as a :class:`~mmtune.serving.Predictor`."""
    from .serving.predictor import Predictor

    return Predictor.load(run_dir, device)


__all__ = ["BadRowsError", "Config", "ConfigError", "fit", "load", "load_config", "__version__"]
