"""What counts as an absent value in a table cell — one rule for validation, datasets, tasks and the cache."""
from __future__ import annotations

import math
from typing import Any


def is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA / NaT. A list or array (a multi-label cell) is never missing as a whole."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, (list, tuple, dict)) or hasattr(value, "shape"):
        return False
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def is_blank(value: Any) -> bool:
    """Missing, or a string of only whitespace: the cell holds nothing usable."""
    return is_missing(value) or (isinstance(value, str) and not value.strip())
