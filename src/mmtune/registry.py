"""Tables of named parts: one per kind (fusions, strategies, losses, optimizers, schedules, modalities,
encoder presets). A table is the single source of the names the config schema accepts, the CLI lists
and the tests iterate over; registering an entry from outside the package makes it usable everywhere.

    from mmtune.fusion import FUSIONS

    @FUSIONS.register("mean")
    class MeanFusion(nn.Module): ...
"""
from __future__ import annotations

from typing import Any, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind of part, in registration order."""

    def __init__(self, kind: str, identifiers: bool = True):
        self.kind = kind
        self.identifiers = identifiers
        self._entries: Dict[str, T] = {}

    def register(self, name: str, entry: Optional[T] = None, *, replace: bool = False) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that registers what it decorates.
        Raises ValueError when the name is taken (unless ``replace``) or not a plain identifier."""
        if not isinstance(name, str) or not (name.isidentifier() if self.identifiers else name.strip() == name != ""):
            raise ValueError(f"{self.kind} name {name!r} must be a plain identifier (letters, digits, _)")

        def add(obj: T) -> T:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name``; ValueError naming the valid names otherwise."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}") from None

    def names(self) -> List[str]:
        return list(self._entries)

    def items(self) -> List[Tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
