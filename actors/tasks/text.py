"""Text tasks on a tokenizer: classify (sequence classification) and embed (mean pooling)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F

from actors.config import INPUT_COLUMNS
from actors.tasks.base import Encoded, RowError, Task, context_length, is_missing, pad_ids

CLASSIFY_SCHEMA = pa.schema([("label", pa.string()), ("label_id", pa.int64()), ("scores", pa.list_(pa.float32()))])


class TextTask(Task):
    """Tokenizes `text` with the tokenizer's defaults and refuses inputs over the context."""

    input_column = INPUT_COLUMNS["classify"]  # embed reads the same column
    left_padding = False  # right padding keeps position ids equal to an unpadded row's

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        self.context = context_length(model.config)
        self.pad_id = _pad_id(model.config, processor)
        self.vocab = model.get_input_embeddings().num_embeddings  # read before adapters wrap it

    def encode(self, value: Any, params: dict) -> Encoded:
        if is_missing(value):
            raise RowError("empty_input", f"{self.input_column} is null or empty")
        if not isinstance(value, str):
            raise RowError("bad_parameter", f"{self.input_column} must be a string, got {type(value).__name__}")
        ids = self.processor(value)["input_ids"]
        self._check_length(len(ids), 0)
        return Encoded(ids, params)

    def _check_length(self, n_input: int, n_new: int) -> None:
        """Raise too_long when the row does not fit the model's context."""
        if self.context is not None and n_input + n_new > self.context:
            extra = f" + max_new_tokens {n_new}" if n_new else ""
            raise RowError("too_long", f"{n_input} input tokens{extra} exceed the model's context of {self.context}")

    def batch(self, rows: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (input_ids, attention_mask) of `rows`."""
        return pad_ids([r.inputs for r in rows], self.pad_id, self.left_padding, self.device)

    def synthetic(self, n: int, seed: int) -> list[Encoded]:
        """`n` rows of 6 random token ids each."""
        gen = torch.Generator().manual_seed(seed)
        return [Encoded(torch.randint(0, self.vocab, (6,), generator=gen).tolist(), {}) for _ in range(n)]


class ClassifyTask(TextTask):
    """Sequence classification: label, label_id, softmax scores."""

    name = "classify"
    auto_class = "AutoModelForSequenceClassification"
    output_schema = CLASSIFY_SCHEMA

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        if model.config.pad_token_id is None:  # decoder classifiers find each row's last token by it
            model.config.pad_token_id = self.pad_id

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        ids, mask = self.batch(rows)
        return self.model(input_ids=ids, attention_mask=mask).logits.float()  # [B, labels]

    def run(self, rows: list[Encoded]) -> list[dict]:
        return label_rows(self.forward(rows), self.model.config.id2label)


class EmbedTask(TextTask):
    """Mean of the last hidden state over the attention mask (optionally unit length)."""

    name = "embed"
    auto_class = "AutoModel"
    output_schema = pa.schema([("embedding", pa.list_(pa.float32()))])

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        ids, mask = self.batch(rows)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [B, T, H]
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, H]
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def run(self, rows: list[Encoded]) -> list[dict]:
        return [{"embedding": e} for e in self.forward(rows).cpu().tolist()]


def label_rows(logits: torch.Tensor, id2label: dict) -> list[dict]:
    """label / label_id / scores per row from classification logits [B, labels]."""
    scores = torch.softmax(logits.float(), dim=-1).cpu()
    out = []
    for row in scores:
        label_id = int(row.argmax())
        label = id2label.get(label_id, id2label.get(str(label_id), str(label_id)))
        out.append({"label": label, "label_id": label_id, "scores": row.tolist()})
    return out


def _pad_id(model_config, tokenizer) -> int:
    """The id used for padding: the model's, else the tokenizer's pad, else EOS, else 0."""
    for value in (getattr(model_config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0
