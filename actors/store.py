"""The adapter store: a folder whose immediate sub-folders are PEFT adapters.

Adapter ids are folder names; they are validated against one pattern and resolved only
inside the store, so a row can never name a path outside it.
"""

from __future__ import annotations

import re
from pathlib import Path

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CONFIG_FILE = "adapter_config.json"


def is_valid_adapter_id(adapter_id: object) -> bool:
    """True when `adapter_id` is a string matching the adapter-id pattern (docs/contract.md "Security")."""
    return isinstance(adapter_id, str) and ADAPTER_ID_PATTERN.fullmatch(adapter_id) is not None


class AdapterStore:
    """Lists and resolves the adapters of one store folder.

    Args:
        root: the store folder, or None for a store with no adapters (base model only).
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"adapter store {str(root)!r} is not a readable folder; pass --adapters DIR")

    def ids(self) -> list[str]:
        """Every adapter id in the store, sorted; refuses sub-folders that are not adapters."""
        if self.root is None:
            return []
        try:
            entries = sorted(p for p in self.root.iterdir() if not p.name.startswith("."))
        except OSError as e:
            raise ValueError(f"adapter store {str(self.root)!r} cannot be listed: {e}") from e
        ids = []
        for entry in entries:
            if not entry.is_dir():
                continue
            if not is_valid_adapter_id(entry.name):
                raise ValueError(
                    f"adapter store {str(self.root)!r}: folder name {entry.name!r} is not a valid adapter id "
                    f"(pattern {ADAPTER_ID_PATTERN.pattern}); rename it"
                )
            if entry.resolve().parent != self.root.resolve():  # path() would refuse it: say so up front
                raise ValueError(
                    f"adapter store {str(self.root)!r}: sub-folder {entry.name!r} links outside the store (to "
                    f"{str(entry.resolve())!r}); adapters are read only from inside the store: copy it in"
                )
            if not (entry / CONFIG_FILE).is_file():
                raise ValueError(
                    f"adapter store {str(self.root)!r}: sub-folder {entry.name!r} has no {CONFIG_FILE}; "
                    "every sub-folder must be a PEFT adapter saved with save_pretrained"
                )
            ids.append(entry.name)
        return ids

    def path(self, adapter_id: str) -> Path:
        """The folder of `adapter_id`, refusing invalid ids and paths that leave the store."""
        if self.root is None or not is_valid_adapter_id(adapter_id):
            raise KeyError(adapter_id)
        root = self.root.resolve()
        path = (root / adapter_id).resolve()
        if path.parent != root or not (path / CONFIG_FILE).is_file():
            raise KeyError(adapter_id)
        return path
