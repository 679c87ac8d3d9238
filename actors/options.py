"""Dataclass fields as command-line flags and typed values: the one mechanism behind the batch
job's flags, `jobs/serve.py`'s flags and `serve run key=value` arguments. No heavy imports."""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (its annotations are strings)."""
    return typing.get_type_hints(cls)


def convert(cls: type, name: str, value: Any) -> Any:
    """`value` as field `name`'s type when it arrives as a string; other values pass as given."""
    if not isinstance(value, str):
        return value
    kind, optional = field_type(_hints(cls)[name])
    if optional and value.lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError("expected true or false")
            return value.lower() in _TRUE
        if kind is list:
            return json.loads(value) if value.startswith("[") else [value]
        return kind(value)
    except ValueError as e:
        raise ValueError(f"argument {name} ({value!r}) is not a valid {kind.__name__}: {e}") from e


def field_type(hint: Any) -> tuple[type, bool]:
    """(the plain type, whether None is allowed) of a field type like `int | None` or `list[str]`."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [a for a in args if a is not type(None)]
        return field_type(kinds[0])[0], True
    return (typing.get_origin(hint) or hint), False


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset(),
              choices: dict[str, tuple] | None = None) -> None:
    """One flag per field of dataclass `cls` (kebab-case), as `HfArgumentParser` builds them.

    Args:
        parser: where the flags are added.
        cls: the dataclass; each field's `metadata["help"]` is its flag's help (PEFT's
            `field(metadata={"help": ...})`), followed by the field's default.
        skip: field names that get no flag.
        choices: allowed values per field name (else the field's `metadata["choices"]`).

    Every flag's default is None (= the field's default), so callers can tell a flag given
    from one left out. A bool field gets `--flag` and `--no-flag`; a list field is repeated.
    """
    hints = _hints(cls)
    choices = choices or {}
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, _ = field_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                              else None)
        help_text = f"{f.metadata.get('help', '')} (default: {default})".strip()
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, action="append", help=help_text.replace("(default", "(repeat for several; default"))
        else:
            parser.add_argument(flag, type=kind, choices=choices.get(f.name, f.metadata.get("choices")),
                                default=None, help=help_text)
