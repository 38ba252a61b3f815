"""The base of every config section, shared by the central schema (``mmtune.config``) and the components
that own their settings (a fusion's or a strategy's ``Config``)."""
from __future__ import annotations

from typing import List, Tuple

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A strict config section: unknown keys and bad values are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def needs(self) -> List[Tuple[str, str, str]]:
        """The optional packages these settings need, as ``(module, extra, feature)`` (``fit`` checks them all
        before any work)."""
        return []


def monitor_mode(monitor: str) -> str:
    """``min`` for a monitored metric that improves downwards (a loss, an RMSE), else ``max``."""
    return "min" if monitor.endswith(("loss", "rmse")) else "max"


class PartConfig(Section):
    """Settings of a part chosen by ``type`` from its table (a fusion, a fine-tuning strategy, a loss).
    Subclasses narrow ``type`` to ``Literal["their name"]``."""

    type: str
