"""What every task shares: the row error type, the task interface, padding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch

ERROR_KINDS = ("unknown_adapter", "empty_input", "too_long", "bad_image", "bad_parameter", "internal")


class RowError(Exception):
    """A problem with one row: it gets `error = "<kind>: <message>"`, the others run."""

    def __init__(self, kind: str, message: str) -> None:
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass
class Encoded:
    """One row ready for the model: its inputs and per-row parameters."""

    inputs: Any  # token ids (list[int]) or a PIL image
    params: dict


class Task:
    """Turns rows into model inputs and model outputs into output columns.

    Subclasses set `name`, `input_column`, `auto_class` and `output_schema`, and implement
    `encode` (one row, may raise RowError), `run` (a batch of encoded rows, inside the
    caller's routing) and `synthetic` (canary rows).
    """

    name: str
    input_column: str
    other_input_columns: tuple[str, ...] = ()  # read instead of `input_column` when a batch has one
    auto_class: str
    output_schema: pa.Schema
    row_parameters: tuple[str, ...] = ()

    def column_of(self, columns) -> str:
        """The input column a batch with these `columns` is read from.

        Raises:
            ValueError: none of the task's input columns, or more than one.
        """
        found = [c for c in (self.input_column, *self.other_input_columns) if c in columns]
        if len(found) > 1:
            raise ValueError(f"batch has both {found[0]!r} and {found[1]!r} columns; task {self.name!r} reads one of "
                             "them")
        if not found:
            names = " or ".join(repr(c) for c in (self.input_column, *self.other_input_columns))
            raise ValueError(f"batch has no {names} column, which task {self.name!r} reads (columns: "
                             f"{sorted(columns)})")
        return found[0]

    def __init__(self, model, processor, config) -> None:
        self.model = model
        self.processor = processor
        self.config = config
        self.device = next(model.parameters()).device

    def encode(self, value: Any, params: dict) -> Encoded:
        raise NotImplementedError

    def run(self, rows: list[Encoded]) -> list[dict]:
        raise NotImplementedError

    def check_virtual(self, row: Encoded, n_virtual: int) -> None:
        """Raise RowError when the row's adapter's `n_virtual` virtual tokens (prompt learning)
        make it too long; tasks without token inputs have nothing to check."""

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        """The model's main output tensor for `rows` (what the canary compares)."""
        raise NotImplementedError

    def synthetic(self, n: int, seed: int) -> list[Encoded]:
        raise NotImplementedError

    def null_outputs(self) -> dict:
        """Output columns of a failed row: all null."""
        return {name: None for name in self.output_schema.names}


def context_length(model) -> int | None:
    """The most input positions `model` takes: max_position_embeddings (n_positions on GPT-2),
    less the positions a RoBERTa-style model skips (see `skipped_positions`)."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value - skipped_positions(model)
    return None


def skipped_positions(model) -> int:
    """Position ids a model never gives a token: RoBERTa-style embeddings (RoBERTa, XLM-R,
    CamemBERT, ...) number a row's tokens from pad_token_id + 1, so roberta-base's 514
    positions hold 512 tokens."""
    for module in model.modules():
        padding_idx = getattr(module, "padding_idx", None)
        if hasattr(module, "create_position_ids_from_input_ids") and isinstance(padding_idx, int):
            return padding_idx + 1
    return 0


def is_missing(value: Any) -> bool:
    """None, NaN (a pandas null) or an empty string/bytes."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, (str, bytes)) and len(value) == 0


def pad_ids(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into (input_ids, attention_mask) [B, L]."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)
