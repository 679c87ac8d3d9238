"""Text generation: transformers' `generate` with per-row stopping and per-row sampling.

Greedy rows are transformers' own greedy search. A sampled row draws from its own
generator seeded with the job's seed, after the same temperature and top-p warping
transformers applies, so its tokens equal `torch.manual_seed(seed); generate(do_sample=True)`
on that row alone, whatever else shares the batch.
"""

from __future__ import annotations

import math
import numbers
import random
from typing import Any

import pyarrow as pa
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList, TopPLogitsWarper

from actors.config import INPUT_COLUMNS
from actors.tasks.base import Encoded, RowError, is_missing
from actors.tasks.text import TextTask

GENERATE_SCHEMA = pa.schema([
    ("generated_text", pa.string()), ("num_input_tokens", pa.int64()),
    ("num_generated_tokens", pa.int64()), ("finish_reason", pa.string()),
])


class GenerateTask(TextTask):
    """Causal LM generation with `max_new_tokens` and `temperature` overridable per row."""

    name = "generate"
    input_column = INPUT_COLUMNS["generate"]
    auto_class = "AutoModelForCausalLM"
    output_schema = GENERATE_SCHEMA
    row_parameters = ("max_new_tokens", "temperature")
    left_padding = True

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else processor.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def encode(self, value: Any, params: dict) -> Encoded:
        params = _row_parameters(params, self.config)
        if is_missing(value):
            raise RowError("empty_input", "prompt is null or empty")
        if not isinstance(value, str):
            raise RowError("bad_parameter", f"prompt must be a string, got {type(value).__name__}")
        ids = self.processor(value)["input_ids"]
        self._check_length(len(ids), params["max_new_tokens"])
        return Encoded(ids, params)

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        ids, mask = self.batch(rows)
        return self.model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]

    def run(self, rows: list[Encoded]) -> list[dict]:
        ids, mask = self.batch(rows)
        limits = [r.params["max_new_tokens"] for r in rows]
        temperatures = [r.params["temperature"] for r in rows]
        stop = self.config.stop
        generation = GenerationConfig(
            max_new_tokens=max(limits), do_sample=False, num_beams=1, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        processors = LogitsProcessorList()
        if any(t > 0 for t in temperatures):
            processors.append(RowSampler(temperatures, self.config.top_p, self.config.seed))
        stopping = StoppingCriteriaList([RowStopper(ids.shape[1], limits, stop, self.processor)])
        sequences = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=generation,
                                        logits_processor=processors, stopping_criteria=stopping)
        new = sequences[:, ids.shape[1]:].cpu().tolist()
        return [self._finish(r, toks[: r.params["max_new_tokens"]]) for r, toks in zip(rows, new)]

    def _finish(self, row: Encoded, tokens: list[int]) -> dict:
        """Cut a row's new tokens at its first EOS or stop string; count and decode them."""
        reason = "length"
        for k, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, reason = tokens[: k + 1], "stop"
                break
        text = self.processor.decode(tokens, skip_special_tokens=True)
        if any(s in text for s in self.config.stop):
            tokens, text = _cut_at_stop(tokens, self.config.stop, self.processor)
            reason = "stop"
        return {"generated_text": text, "num_input_tokens": len(row.inputs),
                "num_generated_tokens": len(tokens), "finish_reason": reason}


def _cut_at_stop(tokens: list[int], stop: list[str], tokenizer) -> tuple[list[int], str]:
    """The shortest prefix of `tokens` whose text holds a stop string, and that text up to it."""
    for k in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return tokens[:k], text[: min(hits)]
    raise AssertionError("stop string vanished from the decoded text")


def _row_parameters(params: dict, config) -> dict:
    """max_new_tokens / temperature of one row: its own columns when set, else the job's."""
    out = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature}
    value = params.get("max_new_tokens")
    if not is_missing(value):
        if not _is_number(value) or not float(value).is_integer() or value < 1:
            raise RowError("bad_parameter", f"max_new_tokens ({value!r}) must be an integer >= 1")
        out["max_new_tokens"] = int(value)
    value = params.get("temperature")
    if not is_missing(value):
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise RowError("bad_parameter", f"temperature ({value!r}) must be a number >= 0")
        out["temperature"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class RowSampler(LogitsProcessor):
    """Samples each row with temperature > 0 from its own seeded generator; the chosen token
    is left as the only finite score, so greedy search picks it."""

    def __init__(self, temperatures: list[float], top_p: float, seed: int | None) -> None:
        self.temperatures = temperatures
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        """The row's generator: seeded with the job's seed (or a random one)."""
        if row not in self.generators:
            seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
            self.generators[row] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[row]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, temperature in enumerate(self.temperatures):
            if temperature <= 0:
                continue
            row = scores[i : i + 1] / temperature  # [1, V]
            if self.top_p is not None:
                row = self.top_p(input_ids[i : i + 1], row)
            probs = torch.softmax(row, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=self._generator(i, scores.device))
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores


class RowStopper(StoppingCriteria):
    """Stops each row at its own max_new_tokens or when its text holds a stop string."""

    def __init__(self, prompt_length: int, limits: list[int], stop: list[str], tokenizer) -> None:
        self.prompt_length = prompt_length
        self.limits = torch.tensor(limits)
        self.stop = stop
        self.tokenizer = tokenizer
        # A stop string that the newest token completes lies within its last few tokens (a
        # character is at most 4 byte-level tokens): decode that tail, not the whole text.
        self.window = 4 * max((len(s) for s in stop), default=0) + 8

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        length = input_ids.shape[1]
        done = self.limits <= length - self.prompt_length
        if self.stop:
            start = max(self.prompt_length, length - self.window)
            for i in (~done).nonzero().flatten().tolist():
                text = self.tokenizer.decode(input_ids[i, start:], skip_special_tokens=True)
                done[i] = any(s in text for s in self.stop)
        return done.to(input_ids.device)
