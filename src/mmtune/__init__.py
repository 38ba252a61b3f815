"""mmtune: fine-tune pretrained encoders on tables of multimodal examples, and ship the result."""
from __future__ import annotations

from .version import __version__

from .config import Config, ConfigError, load_config  # noqa: E402
from .data.manifest import BadRowsError  # noqa: E402


def fit(*args, **kwargs):
    """See :func:`mmtune.recipe.fit.fit`."""
    from .recipe.fit import fit as _fit

    return _fit(*args, **kwargs)


def tune(*args, **kwargs):
    """Hyper-parameter search, best trial refitted into the run bundle. See :func:`mmtune.search.tune`."""
    from .search import tune as _tune

    return _tune(*args, **kwargs)


def align(tables, on=None, time=None, tolerance=None, direction="nearest", paths=()):
    """Join tables recorded apart onto the first; returns ``(joined DataFrame, report)``. See
    :func:`mmtune.data.align.align_tables`."""
    from .data.align import align_tables

    return align_tables(tables, on, time, tolerance, direction, paths)


def load(run_dir, device: str = "cpu", backend=None):
    """Load a run bundle (or an ONNX export bundle) as a :class:`~mmtune.serving.Predictor`; ``backend``:
    ``torch``, ``onnx`` or ``onnx-int8`` (see :meth:`~mmtune.serving.predictor.Predictor.load`)."""
    from .serving.predictor import Predictor

    return Predictor.load(run_dir, device, backend)


__all__ = ["BadRowsError", "Config", "ConfigError", "align", "fit", "load", "load_config", "tune", "__version__"]
