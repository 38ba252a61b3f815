"""Optional parts and the package extras that install them.

The core (config, data, encoders, fusion, training, evaluation, prediction) needs none of these; a
feature that does asks :func:`require`, and ``fit`` checks all of a config's needs before any work."""
from __future__ import annotations

import importlib
import importlib.util
from typing import List, Tuple

class MissingExtraError(ImportError):
    """An optional dependency a chosen feature needs is not installed."""


def _message(module: str, extra: str, feature: str) -> str:
    return f"{feature} needs the optional package {module!r}: pip install 'mmtune[{extra}]' (or 'mmtune[all]')"


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, feature: str):
    """Import and return ``module``; MissingExtraError naming the feature and the extra when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(_message(module, extra, feature)) from None


def missing_for(needs: List[Tuple[str, str, str]]) -> List[str]:
    """The messages for the ``(module, extra, feature)`` needs that are not installed."""
    return [_message(m, e, f) for m, e, f in needs if not available(m)]
