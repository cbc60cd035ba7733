"""The one rule every extension table follows when an entry is added."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def add_entry(table: dict[str, Any], name: str, entry: T, kind: str,
              overwrite: bool = False) -> T:
    """Put ``entry`` in ``table`` under ``name``; a name already taken is refused unless
    ``overwrite`` (so two plug-ins cannot silently shadow each other)."""
    if name in table and not overwrite:
        raise ValueError(f"{kind} {name!r} is already registered (pass overwrite=True to "
                         "replace it)")
    table[name] = entry
    return entry
