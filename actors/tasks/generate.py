"""Text generation: transformers' `generate` with per-row stopping and per-row sampling.

Greedy rows are transformers' own greedy search. A sampled row draws from its own
generator seeded with the job's seed, after the same temperature, top-k and top-p warping
transformers applies, so its tokens equal `torch.manual_seed(seed); generate(do_sample=True)`
on that row alone, whatever else shares the batch.

The model's generation_config.json fills what Switchyard has no setting for, as transformers
fills what a `generate` call leaves unset: its `repetition_penalty` (every row; transformers
skips each row's left padding) and its `top_k` (sampled rows). Switchyard's own settings
(temperature, top_p, max_new_tokens) always win, so the file's `do_sample`, `temperature` and
`top_p` never apply: rows are greedy unless their temperature is > 0. Any other decoding field
of the file is not applied (a warning names it): `take_model_defaults`.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList, TopKLogitsWarper, TopPLogitsWarper

from actors.config import INPUT_COLUMNS, NO_CHAT_TEMPLATE, OTHER_INPUT_COLUMNS, TASK_OUTPUTS
from actors.kvcache import first_capacity, growing_cache
from actors.tasks.base import Encoded, RowError, is_missing
from actors.tasks.text import TextTask

GENERATE_SCHEMA = TASK_OUTPUTS["generate"]
logger = logging.getLogger(__name__)
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
JOB_FIELDS = ("do_sample", "temperature", "top_p", "max_length", "max_new_tokens")  # Switchyard's settings win
# Fields of generation_config.json that do not change which tokens come out.
BOOKKEEPING_FIELDS = ("transformers_version", "_from_model_config", "use_cache", "cache_implementation",
                      "cache_config", "max_cache_len", "compile_config", "disable_compile", "prefill_chunk_size",
                      "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                      "return_dict_in_generate")


@dataclass(frozen=True)
class ModelDefaults:
    """The fields of the model's generation_config.json that Switchyard applies.

    Args:
        repetition_penalty: applied to every row, greedy ones included (1.0: off).
        top_k: applied to sampled rows (0: off).
    """

    repetition_penalty: float = 1.0
    top_k: int = 0


class GenerateTask(TextTask):
    """Causal LM generation with `max_new_tokens` and `temperature` overridable per row."""

    name = "generate"
    input_column = INPUT_COLUMNS["generate"]
    other_input_columns = OTHER_INPUT_COLUMNS["generate"]
    auto_class = "AutoModelForCausalLM"
    output_schema = GENERATE_SCHEMA
    row_parameters = ("max_new_tokens", "temperature")
    left_padding = True

    def __init__(self, model, processor, config) -> None:
        super().__init__(model, processor, config)
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else processor.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.defaults = take_model_defaults(model)
        self.takes_positions = "position_ids" in inspect.signature(model.forward).parameters
        self.grows_cache = takes_growing_cache(model)

    def encode(self, value: Any, params: dict) -> Encoded:
        """A prompt (a string), or chat turns (a list of {role, content}: `chat_ids`)."""
        params = _row_parameters(params, self.config)
        if isinstance(value, (list, tuple)):
            ids = self.chat_ids(list(value))
        else:
            if is_missing(value):
                raise RowError("empty_input", "prompt is null or empty")
            if not isinstance(value, str):
                raise RowError("bad_parameter", f"prompt must be a string, got {type(value).__name__}")
            ids = self._tokenize(value, params["max_new_tokens"])
        self._check_length(len(ids), params["max_new_tokens"])
        return Encoded(ids, params)

    def chat_ids(self, messages: list) -> list[int]:
        """Token ids of chat turns: the tokenizer's chat template with the generation prompt
        added, tokenized without adding special tokens, so BOS appears once, where the
        template puts it (what `apply_chat_template(..., tokenize=True)` gives). Never cut by
        `truncate`: cutting would drop the generation prompt at the end.

        Raises:
            RowError: no turns (`empty_input`), malformed turns or no chat template
                (`bad_parameter`).
        """
        if not messages:
            raise RowError("empty_input", "messages is empty")
        for i, turn in enumerate(messages):
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                    or not isinstance(turn.get("content"), str):
                raise RowError("bad_parameter", f"messages[{i}] must have a string role and a string content")
        if not getattr(self.processor, "chat_template", None):
            raise RowError("bad_parameter", NO_CHAT_TEMPLATE)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.processor(text, add_special_tokens=False)["input_ids"]

    def forward(self, rows: list[Encoded]) -> torch.Tensor:
        ids, mask = self.batch(rows)
        inputs = self._inputs(ids, mask)
        if self.takes_positions and "position_ids" not in inputs:  # as generate() gives them: the logits
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)  # ignore padding
        return self.model(**inputs).logits[:, -ids.shape[1]:].float()  # [B, T, V], the real tokens' positions

    def run(self, rows: list[Encoded]) -> list[dict]:
        ids, mask = self.batch(rows)
        inputs = self._inputs(ids, mask)
        if "cache" in inputs:
            _cover_prefix(inputs, self.pad_id)
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0  # else only new tokens come
        limits = [r.params["max_new_tokens"] for r in rows]
        if self.grows_cache:  # room for the prompt (and any prefix) and new tokens: first_capacity
            prefix = inputs.get("cache")
            room = first_capacity(inputs["attention_mask"].shape[1], max(limits))
            inputs["cache"] = growing_cache(self.model.config, room,
                                            None if prefix is None else [(k, v) for k, v, *_ in prefix])
        temperatures = [r.params["temperature"] for r in rows]
        stop = self.config.stop
        generation = GenerationConfig(
            max_new_tokens=max(limits), do_sample=False, num_beams=1, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None, repetition_penalty=self.defaults.repetition_penalty,
        )
        processors = LogitsProcessorList()
        if any(t > 0 for t in temperatures):
            processors.append(RowSampler(temperatures, self.config.top_p, self.config.seed, self.defaults.top_k))
        stopping = StoppingCriteriaList([RowStopper(prompt_length, limits, stop, self.processor)])
        sequences = self.model.generate(**inputs, generation_config=generation, logits_processor=processors,
                                        stopping_criteria=stopping)
        new = sequences[:, prompt_length:].cpu().tolist()
        return [self.finish(r, toks[: r.params["max_new_tokens"]], stop) for r, toks in zip(rows, new)]

    def finish(self, row: Encoded, tokens: list[int], stop: list[str]) -> dict:
        """Cut a row's new tokens at its first EOS or at the first of `stop`; count and decode them."""
        reason = "length"
        for k, token in enumerate(tokens):
            if token in self.eos_ids:
                tokens, reason = tokens[: k + 1], "stop"
                break
        text = self.processor.decode(tokens, skip_special_tokens=True)
        if any(s in text for s in stop):
            tokens, text = _cut_at_stop(tokens, stop, self.processor)
            reason = "stop"
        return {"generated_text": text, "num_input_tokens": len(row.inputs),
                "num_generated_tokens": len(tokens), "finish_reason": reason}


def takes_growing_cache(model) -> bool:
    """Whether `generate` would make transformers' DynamicCache for `model` itself, so a
    `growing_cache` (the same values, no copy of the whole cache per step) may stand in."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    implementation = getattr(model.generation_config, "cache_implementation", None)
    return ((supports is None or supports()) and implementation in (None, "dynamic")
            and not getattr(model.config, "is_encoder_decoder", False))


def _cover_prefix(inputs: dict, pad_id: int) -> None:
    """Turn a prefix call's model inputs into generate()'s: generate takes the whole sequence
    and skips what the cache already holds, so P placeholder positions (pad ids, or zero
    embeddings) stand in front for the cached prefix; generate computes positions itself
    from the widened mask, as `prefix_inputs` did."""
    del inputs["position_ids"]
    key = "input_ids" if "input_ids" in inputs else "inputs_embeds"
    x = inputs[key]
    width = inputs["attention_mask"].shape[1] - x.shape[1]
    filler = (x.new_full((x.shape[0], width), pad_id) if key == "input_ids"
              else x.new_zeros(x.shape[0], width, x.shape[2]))
    inputs[key] = torch.cat([filler, x], dim=1)


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
    value = params.get("max_new_tokens")  # NaN is a value here, not a null: refused like inf
    if value is not None:
        if not _is_number(value) or not math.isfinite(value) or not float(value).is_integer() or value < 1:
            raise RowError("bad_parameter", f"max_new_tokens ({value!r}) must be an integer >= 1")
        out["max_new_tokens"] = int(value)
    value = params.get("temperature")
    if value is not None:
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise RowError("bad_parameter", f"temperature ({value!r}) must be a number >= 0")
        out["temperature"] = float(value)
    return out


def take_model_defaults(model) -> ModelDefaults:
    """Read what Switchyard applies from the model's generation config, and leave the model
    only its token ids, so that `generate` fills nothing else in (transformers fills every
    field a call leaves unset from it).

    Args:
        model: the loaded causal LM; its `generation_config` is replaced.

    Returns:
        The file's repetition_penalty and top_k.

    Raises:
        ValueError: a repetition_penalty or top_k that transformers would refuse.
    """
    source = model.generation_config
    defaults = ModelDefaults(_file_value(source, "repetition_penalty", 1.0), _file_value(source, "top_k", 0))
    if source.do_sample:
        logger.info("generation_config.json asks for sampling (temperature %s, top_p %s); Switchyard samples only "
                    "rows whose temperature is > 0 (--temperature, --top-p), the others stay greedy",
                    source.temperature, source.top_p)
    ignored = _ignored_fields(source)
    if ignored:
        logger.warning("generation_config.json sets %s, which Switchyard does not apply (it applies only "
                       "repetition_penalty, top_k and the token ids; see README)", ", ".join(ignored))
    model.generation_config = GenerationConfig(**{k: getattr(source, k) for k in TOKEN_FIELDS
                                                  if getattr(source, k, None) is not None})
    return defaults


def _file_value(config: GenerationConfig, name: str, off: float | int) -> float | int:
    """repetition_penalty (a float > 0) or top_k (an integer >= 0) of the file, `off` when unset."""
    value = getattr(config, name, None)
    if value is None:
        return off
    if name == "top_k":
        ok = _is_number(value) and float(value).is_integer() and value >= 0
    else:
        ok = _is_number(value) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"the model's generation_config.json has {name} {value!r}; it must be "
                         f"{'an integer >= 0' if name == 'top_k' else 'a number > 0'}: fix or remove it")
    return int(value) if name == "top_k" else float(value)


def _ignored_fields(config: GenerationConfig) -> list[str]:
    """Decoding fields the file sets to other than transformers' defaults, which Switchyard ignores."""
    library = getattr(config, "_get_default_generation_params", dict)()  # transformers 5: its global defaults
    handled = {*TOKEN_FIELDS, *JOB_FIELDS, *BOOKKEEPING_FIELDS, "repetition_penalty", "top_k"}
    return sorted(f"{k}={v!r}" for k, v in config.to_diff_dict().items()
                  if k not in handled and v is not None and v != library.get(k))


def _is_number(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class RowSampler(LogitsProcessor):
    """Samples each row with temperature > 0 from its own seeded generator, after
    temperature, top-k and top-p in transformers' order; the chosen token is left as the only
    finite score, so greedy search picks it.

    Args:
        temperatures: per row (0: the row stays greedy).
        top_p: nucleus sampling (1: off).
        seed: every sampled row's generator seed (None: a random one per row).
        top_k: keep the k most likely tokens (0: off).
    """

    def __init__(self, temperatures: list[float], top_p: float, seed: int | None, top_k: int = 0) -> None:
        self.temperatures = temperatures
        self.top_k = TopKLogitsWarper(top_k) if top_k > 0 else None
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1 else None
        self.seed = seed
        self.generators: dict[int, torch.Generator] = {}

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        """The row's generator: seeded with the job's seed (or a random one)."""
        if row not in self.generators:
            seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
            self.generators[row] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[row]

    def draw(self, row: int, input_ids: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
        """One sampled token of `row` from its scores [1, V] (input_ids [1, T]: its tokens so far)."""
        scores = scores / temperature
        if self.top_k is not None:
            scores = self.top_k(input_ids, scores)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self._generator(row, scores.device))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, temperature in enumerate(self.temperatures):
            if temperature <= 0:
                continue
            token = self.draw(i, input_ids[i : i + 1], scores[i : i + 1], temperature)
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
