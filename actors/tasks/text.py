"""Text tasks on a tokenizer: classify (sequence classification) and embed (pooled as the
folder's sentence-transformers files say)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from actors.config import INPUT_COLUMNS, TASK_OUTPUTS
from actors.embedding import embedding_spec
from actors.kinds.prompt import is_encoder
from actors.layers import current_route
from actors.tasks.base import Encoded, RowError, Task, context_length, is_missing, pad_ids
from actors.tasks.pooling import pool

logger = logging.getLogger(__name__)

CLASSIFY_SCHEMA = TASK_OUTPUTS["classify"]
SCORE_FUNCTIONS = {"softmax": lambda x: torch.softmax(x, dim=-1), "sigmoid": torch.sigmoid, "none": lambda x: x}


class TextTask(Task):
    """Tokenizes `text` with the tokenizer's defaults and refuses inputs over the context."""

    input_column = INPUT_COLUMNS["classify"]  # embed reads the same column
    left_padding = False  # right padding keeps position ids equal to an unpadded row's

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        self.context = context_length(model)
        self.pad_id = _pad_id(model.config, processor)
        self.vocab = model.get_input_embeddings().num_embeddings  # read before adapters wrap it
        self.decoder = not is_encoder(model.config)  # rows with virtual tokens go left-padded then
        warned = getattr(processor, "deprecation_warnings", None)
        if isinstance(warned, dict):  # rows over the context are refused as too_long: no tokenizer warning
            warned["sequence-length-is-longer-than-the-specified-maximum"] = True

    def encode(self, value: Any, params: dict) -> Encoded:
        if is_missing(value):
            raise RowError("empty_input", f"{self.input_column} is null or empty")
        if not isinstance(value, str):
            raise RowError("bad_parameter", f"{self.input_column} must be a string, got {type(value).__name__}")
        ids = self._tokenize(value, 0)
        if not ids:  # nothing to pool or classify (a tokenizer without special tokens)
            raise RowError("empty_input", f"{self.input_column} tokenizes to no tokens")
        self._check_length(len(ids), 0)
        return Encoded(ids, params)

    def _tokenize(self, value: str, n_new: int) -> list[int]:
        """The text's token ids; with the `truncate` option, cut to what fits (`n_new` tokens
        left for generation) on the side the tokenizer's `truncation_side` names, its special
        tokens kept, as `tokenizer(text, truncation=True, max_length=...)` does."""
        limit = self._max_input(n_new)
        if self.config.truncate and limit is not None and limit > 0:
            return self.processor(value, truncation=True, max_length=limit)["input_ids"]
        return self.processor(value)["input_ids"]

    def _max_input(self, n_new: int) -> int | None:
        """How many input tokens fit beside `n_new` new ones (None: no limit)."""
        return None if self.context is None else self.context - n_new

    def _check_length(self, n_input: int, n_new: int) -> None:
        """Raise too_long when the row does not fit the model's context."""
        if self.context is not None and n_input + n_new > self.context:
            extra = f" + max_new_tokens {n_new}" if n_new else ""
            raise RowError("too_long", f"{n_input} input tokens{extra} exceed the model's context of {self.context}")

    def check_virtual(self, row: Encoded, n_virtual: int) -> None:
        """Raise too_long when the row's adapter's virtual tokens take it past the context."""
        n_new = row.params.get("max_new_tokens", 0)
        if self.context is not None and n_virtual and len(row.inputs) + n_virtual + n_new > self.context:
            extra = f" + max_new_tokens {n_new}" if n_new else ""
            raise RowError("too_long", f"{len(row.inputs)} input tokens + {n_virtual} virtual tokens of its adapter"
                           f"{extra} exceed the model's context of {self.context}")

    def batch(self, rows: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (input_ids, attention_mask) of `rows`."""
        return pad_ids([r.inputs for r in rows], self.pad_id, self.left_padding, self.device)

    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """Model inputs for padded `ids`: the ids themselves, or, when rows of the call's route
        have virtual tokens (prompt tuning, P-tuning), embeddings with each row's virtual tokens
        in front of its own tokens, padded anew on the task's side (PEFT puts them in front of
        the row alone: n more positions, n ones in front of the mask). When rows have a prefix
        (prefix tuning), also the cache holding it, the mask widened over it and the positions
        (see `prefix_inputs`)."""
        route = current_route()
        if route is None or route.virtual is None:
            inputs = {"input_ids": ids, "attention_mask": mask}
        else:
            inputs = self._with_virtual(ids, mask, route.virtual)
        if route is not None and route.prefix is not None:
            inputs.update(prefix_inputs(route.prefix, inputs["attention_mask"]))
        return inputs

    def _with_virtual(self, ids: torch.Tensor, mask: torch.Tensor, virtual: list) -> dict:
        """inputs_embeds and attention_mask with each row's virtual tokens (or none) in front."""
        embeds = self.model.get_input_embeddings()(ids)  # [B, L, d], the routed embedding for every row
        rows = [embeds[b][mask[b].bool()] for b in range(ids.shape[0])]  # each row's real tokens
        rows = [r if v is None else torch.cat([v.to(r.dtype), r]) for r, v in zip(rows, virtual)]
        length = max(r.shape[0] for r in rows)
        out = embeds.new_zeros(len(rows), length, embeds.shape[2])  # [B, T, d]
        out_mask = mask.new_zeros(len(rows), length)
        left = self.left_padding or self.decoder  # a decoder classifier pools the last position
        for b, r in enumerate(rows):
            span = slice(length - r.shape[0], length) if left else slice(0, r.shape[0])
            out[b, span] = r
            out_mask[b, span] = 1
        return {"inputs_embeds": out, "attention_mask": out_mask}

    def synthetic(self, n: int, seed: int) -> list[Encoded]:
        """`n` rows of 6 random token ids each."""
        gen = torch.Generator().manual_seed(seed)
        return [Encoded(torch.randint(0, self.vocab, (6,), generator=gen).tolist(), {}) for _ in range(n)]


class ClassifyTask(TextTask):
    """Sequence classification: label, label_id, scores (softmax, sigmoid or the logits, by
    the model's problem_type: see `score_function`)."""

    name = "classify"
    auto_class = "AutoModelForSequenceClassification"
    output_schema = CLASSIFY_SCHEMA

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        if model.config.pad_token_id is None:  # decoder classifiers find each row's last token by it
            model.config.pad_token_id = self.pad_id
        self.score_function = score_function(model.config, config.scores)

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        ids, mask = self.batch(rows)
        inputs = self._inputs(ids, mask)
        if "inputs_embeds" in inputs and self.decoder:  # left-padded: positions as each row alone has them
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        return self.model(**inputs).logits.float()  # [B, labels]

    def run(self, rows: list[Encoded]) -> list[dict]:
        return label_rows(self.forward(rows), self.model.config.id2label, self.score_function)


class EmbedTask(TextTask):
    """The last hidden state pooled as the folder's sentence-transformers files say (mean
    over the attention mask without them), then unit length if they or the options say so."""

    name = "embed"
    auto_class = "AutoModel"
    output_schema = TASK_OUTPUTS["embed"]

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        self.spec = embedding_spec(config.model, config.pooling, config.normalize)
        logger.info("embed pooling: %s (%s), normalize %s", "+".join(self.spec.modes), self.spec.source,
                    self.spec.normalize)

    def _max_input(self, n_new: int) -> int | None:
        """Also within sentence-transformers' max_seq_length."""
        limits = [x for x in (super()._max_input(n_new), self.spec.max_length) if x is not None]
        return min(limits) if limits else None

    def _check_length(self, n_input: int, n_new: int) -> None:
        """Also refuse rows over sentence-transformers' max_seq_length, which it would truncate."""
        limit = self.spec.max_length
        if limit is not None and n_input > limit:
            raise RowError("too_long", f"{n_input} input tokens exceed the max_seq_length of {limit} in the model "
                           "folder's sentence_bert_config.json (sentence-transformers would truncate the text)")
        super()._check_length(n_input, n_new)

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        ids, mask = self.batch(rows)
        inputs = self._inputs(ids, mask)
        hidden = self.model(**inputs).last_hidden_state.float()  # [B, T, H]
        if "inputs_embeds" in inputs:  # pool the real tokens only: drop each row's virtual positions
            hidden = _real_positions(hidden, mask, current_route().virtual)
        return pool(hidden, mask, self.spec)  # [B, H * modes]

    def run(self, rows: list[Encoded]) -> list[dict]:
        return [{"embedding": e} for e in self.forward(rows).cpu().tolist()]


def prefix_inputs(prefix: list, token_mask: torch.Tensor) -> dict:
    """A cache holding each row's prefix keys and values, as PEFT caches one row's.

    With P the longest prefix among the rows, each row's n_b slots are right-aligned in P and
    the others masked, so the mask is `cat(prefix_mask, token_mask)` and a row's tokens take
    positions n_b, n_b + 1, ... (`cumsum(mask) - 1`) whatever its padding.

    Args:
        prefix: per row, `[layers * 2, heads, n_b, head_dim]` or None (no prefix).
        token_mask: the tokens' attention mask [B, T].

    Returns:
        `cache` (a DynamicCache with P positions), `attention_mask` [B, P + T] and
        `position_ids` [B, T].
    """
    from transformers import DynamicCache

    ref = next(p for p in prefix if p is not None)
    width = max(p.shape[2] for p in prefix if p is not None)
    states = ref.new_zeros(ref.shape[0], len(prefix), ref.shape[1], width, ref.shape[3])  # [2L, B, H, P, hd]
    prefix_mask = token_mask.new_zeros(len(prefix), width)
    for b, p in enumerate(prefix):
        if p is not None:
            states[:, b, :, width - p.shape[2]:] = p
            prefix_mask[b, width - p.shape[2]:] = 1
    mask = torch.cat([prefix_mask, token_mask], dim=1)
    cache = DynamicCache([(states[2 * layer], states[2 * layer + 1]) for layer in range(states.shape[0] // 2)])
    return {"cache": cache, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)[:, width:]}


def _real_positions(hidden: torch.Tensor, mask: torch.Tensor, virtual: list) -> torch.Tensor:
    """The hidden states of each row's real tokens, laid out as `mask` has them (right
    padded), without the virtual tokens in front of them: [B, L, H]."""
    out = hidden.new_zeros(mask.shape[0], mask.shape[1], hidden.shape[2])
    for b, v in enumerate(virtual):
        n, length = 0 if v is None else v.shape[0], int(mask[b].sum())
        out[b, :length] = hidden[b, n : n + length]
    return out


def score_function(model_config, scores: str = "auto") -> str:
    """The function from logits to scores, as transformers' text- and image-classification
    pipelines pick it by default: none (the logits) for problem_type regression; sigmoid for
    multi_label_classification or a single logit; softmax otherwise. The `scores` option
    "logits" asks for the logits whatever the problem_type.

    Args:
        model_config: the model's PretrainedConfig (problem_type, num_labels).
        scores: the Predictor's `scores` option, "auto" or "logits".

    Returns:
        A key of SCORE_FUNCTIONS.
    """
    problem = getattr(model_config, "problem_type", None)
    if scores == "logits" or problem == "regression":
        return "none"
    if problem == "multi_label_classification" or model_config.num_labels == 1:
        return "sigmoid"
    if problem == "single_label_classification" or model_config.num_labels > 1:
        return "softmax"
    named = getattr(model_config, "function_to_apply", None)  # the pipeline's last resort
    named = str(getattr(named, "value", named)).lower()
    return named if named in SCORE_FUNCTIONS else "none"


def label_rows(logits: torch.Tensor, id2label: dict, function: str = "softmax") -> list[dict]:
    """label / label_id / scores per row from classification logits.

    Args:
        logits: [B, labels].
        id2label: the model config's label names.
        function: a key of SCORE_FUNCTIONS (see `score_function`).

    Returns:
        One dict per row: `scores` (the function of the logits), `label_id` (the argmax of
        the scores, as the pipeline's top-1) and `label` (its id2label name).
    """
    scores = SCORE_FUNCTIONS[function](logits.float()).cpu()
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
