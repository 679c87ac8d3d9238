"""The adapter store: a folder whose immediate sub-folders are PEFT adapters, plus adapters
registered by name at a path of their own (`--lora-modules name=path`, as vLLM has it).

Adapter ids are folder names (or the registered names); they are validated against one
pattern and resolved only inside the store or to a registered path, so a row can never name
any other path.
"""

from __future__ import annotations

import re
from pathlib import Path

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CONFIG_FILE = "adapter_config.json"


def is_valid_adapter_id(adapter_id: object) -> bool:
    """True when `adapter_id` is a string matching the adapter-id pattern (docs/contract.md "Security")."""
    return isinstance(adapter_id, str) and ADAPTER_ID_PATTERN.fullmatch(adapter_id) is not None


def parse_lora_modules(entries: list[str] | None) -> dict[str, str]:
    """`name=path` entries (vLLM's `--lora-modules`) as {name: path}.

    Raises:
        ValueError: an entry without `=`, an invalid or repeated name.
    """
    modules: dict[str, str] = {}
    for entry in entries or []:
        name, sep, path = str(entry).partition("=")
        if not sep or not path:
            raise ValueError(f"--lora-modules entry {entry!r} must be name=path")
        if not is_valid_adapter_id(name):
            raise ValueError(f"--lora-modules name {name!r} is not a valid adapter id (pattern "
                             f"{ADAPTER_ID_PATTERN.pattern})")
        if name in modules:
            raise ValueError(f"--lora-modules names {name!r} twice")
        modules[name] = path
    return modules


class AdapterStore:
    """Lists and resolves the adapters of one store folder and of registered paths.

    Args:
        root: the store folder, or None (no store folder).
        modules: adapters outside the store, {name: folder} (`parse_lora_modules`).

    Raises:
        ValueError: a store that is not a readable folder, or a registered path that is not
            an adapter folder.
    """

    def __init__(self, root: str | Path | None, modules: dict[str, str] | None = None) -> None:
        self.root = None if root is None else Path(root)
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"adapter store {str(root)!r} is not a readable folder; pass --adapters DIR")
        self.modules = {name: Path(path).resolve() for name, path in (modules or {}).items()}
        for name, path in self.modules.items():
            if not (path / CONFIG_FILE).is_file():
                raise ValueError(f"--lora-modules {name}={path}: no {CONFIG_FILE} there; give the folder a PEFT "
                                 "adapter was saved into with save_pretrained")

    def ids(self) -> list[str]:
        """Every adapter id (the store's folders and the registered names), sorted; refuses
        sub-folders that are not adapters and registered names that are store folders too."""
        ids = self._folder_ids()
        clash = sorted(set(ids) & set(self.modules))
        if clash:
            raise ValueError(f"--lora-modules name {clash[0]!r} is also a folder of the adapter store "
                             f"{str(self.root)!r}; pick another name")
        return sorted([*ids, *self.modules])

    def _folder_ids(self) -> list[str]:
        """The store folder's adapter ids, sorted."""
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
        if adapter_id in self.modules:
            return self.modules[adapter_id]
        if self.root is None or not is_valid_adapter_id(adapter_id):
            raise KeyError(adapter_id)
        root = self.root.resolve()
        path = (root / adapter_id).resolve()
        if path.parent != root or not (path / CONFIG_FILE).is_file():
            raise KeyError(adapter_id)
        return path
