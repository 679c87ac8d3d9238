"""Continuous batching for task generate: a row joins the running mixed batch at the next
decoding step (under load, with others, within MAX_HELD_STEPS) and ends the step it finishes,
each row through its own adapter.

`DecodeEngine` owns one thread that loops: admit waiting rows (encode them, pin their
adapter's slot for as long as they decode), prefill the newcomers together, merge their
key/value cache into the running batch's (left-padded to a common length, rows ordered by
slot), then run one decoding step over every live row under a route rebuilt only when the
batch's rows change. Each row picks its token as `GenerateTask.run` does (the model's
repetition penalty, then greedy or its own seeded sampler), stops at its own EOS,
max_new_tokens, stop string or cancellation, and ends with `GenerateTask._finish`, so a row's
answer is the same whichever batcher ran it and whatever else shared its steps.

Rows report through a `sink` called in the engine's thread: `{"delta", "logprobs"}` as text
becomes safe to show (streaming rows only), then `{"final": row}` once. Text is held back
while a stop string could still cut it or a character is incomplete, so what a stream shows
adds up to the final text. No Ray here: Serve wraps it (actors/serve/model.py).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, RepetitionPenaltyLogitsProcessor

from actors.kvcache import cache_over, first_capacity
from actors.layers import Route, routing
from actors.runtime import UnknownAdapterError
from actors.tasks.base import Encoded, RowError
from actors.tasks.generate import RowSampler

logger = logging.getLogger(__name__)
# When waiting rows join a running batch (DecodeEngine's defaults): each join costs the live
# rows a prefill forward and a copy of the batch's cache (and a new route), so under load they
# join in groups. Waiting rows join at once while they number at least 1/JOIN_RATIO of the live
# rows (so any newcomer beside up to 8 live rows), else after MAX_HELD_STEPS steps at most.
# Finished rows stay in the tensors (their tokens ignored) until a join or until they are more
# than DROP_FRACTION of the batch. bench/engine_loop.py measures the choice.
JOIN_RATIO = 8
MAX_HELD_STEPS = 8
DROP_FRACTION = 0.25
REPLACEMENT = "\ufffd"  # what decode shows for a character whose bytes have not all come yet


@dataclass
class RowRequest:
    """One row for the engine.

    Args:
        value: a prompt (string) or chat turns (list of {role, content}).
        adapter: the adapter to route through (None: the base model).
        params: max_new_tokens / temperature of the row (None: the server's).
        top_p, seed, stop: the row's sampling and stopping (the server's when not given).
        logprobs: how many top alternatives to report per token (0: the chosen token's
            logprob only; None: no logprobs).
        stream: report text as it becomes safe to show.
        sink: called in the engine's thread with each report.
        encoded: the row already encoded (`Predictor.encode_row`), or None.
    """

    value: Any
    adapter: str | None
    sink: Callable[[dict], None]
    params: dict = field(default_factory=dict)
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    logprobs: int | None = None
    stream: bool = False
    encoded: Encoded | None = None
    cancelled: bool = False  # set by `cancel`: the row leaves the batch at the next step

    def cancel(self) -> None:
        """Stop the row (its client went away); it reports nothing more."""
        self.cancelled = True


@dataclass
class _Live:
    """A row in the running batch."""

    request: RowRequest
    encoded: Encoded
    pins: dict[str, int]
    slot: int
    version: str | None
    stop: list[str]
    sampler: RowSampler | None
    context: list[int]  # what the repetition penalty sees: its prompt ids, then its new tokens
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    done: bool = False  # finished (reported, unpinned); still in the batch's tensors until the next rebuild
    sent: str = ""  # text already streamed
    reported: int = 0  # logprobs already streamed


class DecodeEngine:
    """Continuous batching over one Predictor of task generate.

    Args:
        predictor: the Predictor (its model, adapters, task and defaults).
        max_rows: most rows decoding at once (`capacity`); more wait for a row to finish.
        join_ratio, max_held_steps, drop_fraction: when rows join and leave (see JOIN_RATIO);
            max_held_steps=0 and drop_fraction=0: every step (rows join at the next step,
            finished ones leave at once).
    """

    def __init__(self, predictor: Any, max_rows: int, *, join_ratio: float = JOIN_RATIO,
                 max_held_steps: int = MAX_HELD_STEPS, drop_fraction: float = DROP_FRACTION) -> None:
        if predictor.config.task != "generate":
            raise ValueError(f"continuous batching runs task generate, not {predictor.config.task!r}")
        self.predictor = predictor
        self.task = predictor.task
        self.runtime = predictor.runtime
        self.capacity = max_rows
        self.join_ratio, self.max_held_steps, self.drop_fraction = join_ratio, max_held_steps, drop_fraction
        self.broken: BaseException | None = None  # a fatal model error: the replica must go
        self.steps = 0  # decoding steps run
        self.rows_started = 0  # rows prefilled
        self.rows_joined = 0  # of them, rows that joined while other rows were decoding
        self.max_rows = 0  # most rows in one step
        self.max_adapters = 0  # most distinct adapters (the base model counts) in one step
        self.rows_cancelled = 0  # rows that left early: their client went away
        self._waiting: deque[RowRequest] = deque()
        self._held = 0  # steps the waiting rows have been held back (`_hold`)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._live: list[_Live] = []
        self._finished = 0  # live rows that finished (`done`): they leave the batch at the next rebuild
        self._cache: DynamicCache | None = None
        self._mask = self._positions = self._last = None  # [B, T], [B], [B]
        self._route: Route | None = None
        penalty = self.task.defaults.repetition_penalty
        self._penalty = RepetitionPenaltyLogitsProcessor(penalty) if penalty != 1.0 else None
        parameters = inspect.signature(self.task.model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.2x
        self._model_args = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}  # the last position only

    @property
    def alive(self) -> bool:
        """False once the loop's thread has stopped (it never should)."""
        return self._thread is None or self._thread.is_alive()

    @property
    def live_rows(self) -> int:
        """Rows decoding now."""
        return len(self._live) - self._finished

    def submit(self, request: RowRequest) -> None:
        """Queue a row; it joins the running batch at the next step."""
        with self._wake:
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="switchyard-decode", daemon=True)
                self._thread.start()
            self._wake.notify()

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        """Forever: admit, prefill newcomers, one decoding step over everyone."""
        with torch.inference_mode():
            while True:
                new = self._admit()
                try:
                    if new:
                        self._prefill(new)
                    elif self._finished > self.drop_fraction * len(self._live):
                        self._rebuild([], None)
                    if self._live:
                        self._decode_one_token()
                except Exception as e:  # noqa: BLE001 - every live row fails; the loop goes on
                    self._fail_all(e, new)

    def _admit(self) -> list[_Live]:
        """Waiting rows that fit now, encoded and pinned (waits while there is nothing to do)."""
        with self._wake:
            while not self._waiting and not self._live:
                self._wake.wait()
            room = self.capacity - len(self._live) + self._finished
            if self._hold(room):
                return []
            taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        admitted, blocked = [], []
        for request in taken:
            if request.cancelled:
                continue
            row = self._start(request)
            if row is False:
                blocked.append(request)
            elif row is not None:
                admitted.append(row)
        if blocked:  # their adapters' slots are pinned by live rows: they try again next step
            with self._wake:
                self._waiting.extendleft(reversed(blocked))
        return admitted

    def _hold(self, room: int) -> bool:
        """Whether the waiting rows wait one more step (see JOIN_RATIO); called under the lock."""
        waiting = min(len(self._waiting), room)
        if (waiting and self.live_rows and waiting * self.join_ratio < self.live_rows
                and self._held < self.max_held_steps):
            self._held += 1
            return True
        self._held = 0
        return False

    def _start(self, request: RowRequest) -> _Live | None | bool:
        """The row, ready to prefill; None when it failed (its sink has the error); False when
        its adapter cannot get a slot right now."""
        adapter = request.adapter
        try:
            encoded = request.encoded or self.predictor.encode_row(request.value, adapter, request.params)
            pins = self.runtime.try_acquire([adapter]) if adapter is not None else {}
        except RowError as e:
            return _report_error(request, str(e))
        except UnknownAdapterError:
            return _report_error(request, f"unknown_adapter: adapter {adapter!r} is not in the adapter store")
        except Exception as e:  # noqa: BLE001 - e.g. an adapter file that no longer loads: this row fails
            logger.warning("row failed to start: %s", e)
            return _report_error(request, f"internal: {type(e).__name__}: {e}")
        if pins is None:
            return False
        config = self.predictor.config
        temperature = encoded.params["temperature"]
        top_p = request.top_p if request.top_p is not None else config.top_p
        seed = request.seed if request.seed is not None else config.seed
        sampler = RowSampler([temperature], top_p, seed, self.task.defaults.top_k) if temperature > 0 else None
        slot = pins.get(adapter, 0)
        stop = request.stop if request.stop is not None else list(config.stop)
        return _Live(request, encoded, pins, slot, self.runtime.version_of(slot), stop, sampler,
                     list(encoded.inputs))

    def _prefill(self, new: list[_Live]) -> None:
        """Run the newcomers' prompts together, pick their first tokens, merge them in."""
        self.rows_started += len(new)
        self.rows_joined += len(new) if len(self._live) > self._finished else 0
        route = self.runtime.make_route([r.slot for r in new])
        ids, mask = self.task.batch([r.encoded for r in new])
        with routing(route):
            inputs = self.task._inputs(ids, mask)  # virtual tokens and prefixes, as GenerateTask.run has them
            cache = inputs.pop("cache", None)
            if cache is None:
                cache = DynamicCache()  # full layers (the model's own may slide): the merge aligns every row
            if "position_ids" not in inputs and self.task.takes_positions:
                inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
            out = self.task.model(**inputs, **{self._cache_arg: cache}, use_cache=True, **self._model_args)
        mask = inputs["attention_mask"]
        tokens = self._choose(new, out.logits[:, -1].float())
        self._advance(new, tokens)
        self._rebuild(new, (_cache_of(out), mask, mask.sum(1), tokens))

    def _decode_one_token(self) -> None:
        """One step: every live row's last token in, its next token out."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        inputs = {"input_ids": self._last[:, None], "attention_mask": self._mask}
        if self.task.takes_positions:
            inputs["position_ids"] = self._positions[:, None]
        with routing(self._route):
            out = self.task.model(**inputs, **{self._cache_arg: self._cache}, use_cache=True, **self._model_args)
        self._cache = _cache_of(out)
        self._positions = self._positions + 1
        rows = list(self._live)
        tokens = self._choose(rows, out.logits[:, -1].float())
        self._last = tokens
        self.steps += 1
        self._advance(rows, tokens)

    # -- tokens ------------------------------------------------------------------------------

    def _choose(self, rows: list[_Live], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token from its logits [B, V]; logprobs noted for rows that want them.
        Rows already finished (kept in the tensors until a rebuild) get the argmax, unused."""
        scores = logits
        if self._penalty is not None:
            scores = torch.cat([logits[i : i + 1] if r.done else
                                self._penalty(_ids(r.context, logits.device), logits[i : i + 1].clone())
                                for i, r in enumerate(rows)])
        tokens = scores.argmax(-1)  # [B]
        for i, row in enumerate(rows):
            if row.sampler is not None and not row.done:
                temperature = row.encoded.params["temperature"]
                tokens[i] = row.sampler.draw(0, _ids(row.context, logits.device), scores[i : i + 1].clone(),
                                             temperature).item()
        wanted = [i for i, r in enumerate(rows) if r.request.logprobs is not None and not r.done]
        if wanted:
            logprobs = torch.log_softmax(logits[wanted], dim=-1)  # the model's own distribution
            for j, i in enumerate(wanted):
                rows[i].logprobs.append(self._logprob_entry(logprobs[j], int(tokens[i]), rows[i].request.logprobs))
        return tokens

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, top: int) -> dict:
        """The chosen token's logprob and the `top` most likely alternatives."""
        entry = {"id": token, "token": self._piece(token), "logprob": float(logprobs[token]), "top": []}
        if top:
            values, ids = logprobs.topk(top)
            entry["top"] = [(self._piece(t), float(v)) for t, v in zip(ids.tolist(), values.tolist())]
        return entry

    def _piece(self, token: int) -> str:
        """One token's text as OpenAI reports it."""
        return self.task.processor.decode([token])

    def _advance(self, rows: list[_Live], tokens: torch.Tensor) -> None:
        """Append each row's token; report; drop the rows that finished."""
        for row, token in zip(rows, tokens.tolist()):
            if row.done:  # finished at an earlier step, not yet dropped from the tensors
                continue
            row.tokens.append(token)
            row.context.append(token)
            if self._done(row, token):
                row.done = True
                self._finished += 1
                self.runtime.release(row.pins)
                self._finish(row)
            elif row.request.stream:
                self._stream(row)

    def _done(self, row: _Live, token: int) -> bool:
        """EOS, max_new_tokens, a stop string in the newest text, or a cancelled request."""
        if token in self.task.eos_ids or len(row.tokens) >= row.encoded.params["max_new_tokens"]:
            return True
        if row.request.cancelled:
            return True
        if row.stop:
            window = 4 * max(len(s) for s in row.stop) + 8  # as RowStopper: a stop string lies in the tail
            text = self.task.processor.decode(row.tokens[-window:], skip_special_tokens=True)
            return any(s in text for s in row.stop)
        return False

    def _finish(self, row: _Live) -> None:
        """Report the row's answer: its tokens cut and decoded as GenerateTask's rows are."""
        if row.request.cancelled:
            self.rows_cancelled += 1
            return
        out = self.task.finish(row.encoded, row.tokens, row.stop)  # the one rule for EOS and stop strings
        n = out["num_generated_tokens"]
        final = {**out, "error": None, "adapter_version": row.version}
        if row.request.logprobs is not None:
            final["logprobs"] = row.logprobs[:n]
        if row.request.stream:
            text = out["generated_text"]
            if not text.startswith(row.sent):  # cannot happen with the hold-back rules; say so if it does
                logger.warning("streamed text %r is not a prefix of the final text %r", row.sent, text)
            final["delta"] = text[len(row.sent):] if text.startswith(row.sent) else ""
            if row.request.logprobs is not None:
                final["delta_logprobs"] = final["logprobs"][row.reported:]
        row.request.sink({"final": final})

    def _stream(self, row: _Live) -> None:
        """Report the text that no later token or stop string can change."""
        text = self.task.processor.decode(row.tokens, skip_special_tokens=True)
        safe = text.rstrip(REPLACEMENT)
        safe = safe[: len(safe) - _held_back(safe, row.stop)]
        if len(safe) > len(row.sent) and safe.startswith(row.sent):
            delta, row.sent = safe[len(row.sent):], safe
            report = {"delta": delta}
            if row.request.logprobs is not None:
                report["logprobs"] = row.logprobs[row.reported:]
                row.reported = len(row.logprobs)
            row.request.sink(report)

    # -- the batch's state -------------------------------------------------------------------

    def _rebuild(self, new: list[_Live], prefilled: tuple | None) -> None:
        """The running batch without its finished rows and with the prefilled newcomers
        (`prefilled`: their cache, mask, positions and first tokens), in one copy of the
        cache: rows ordered by slot (each adapter's rows contiguous), left-padded to the
        longest row, columns no row uses dropped. A new route for its rows."""
        parts = []  # (rows, cache, mask, positions, last, index of the rows kept)
        for rows, state in ((self._live, (self._cache, self._mask, self._positions, self._last)),
                            (new, prefilled)):
            keep = [i for i, r in enumerate(rows) if not r.done]
            if keep:
                parts.append(([rows[i] for i in keep], *state, keep))
        self._finished = 0
        self._live = [r for part in parts for r in part[0]]
        if not self._live:
            self._cache = self._mask = self._positions = self._last = self._route = None
            return
        order = sorted(range(len(self._live)), key=lambda i: self._live[i].slot)
        self._live = [self._live[i] for i in order]
        device = parts[0][2].device
        where = torch.empty(len(order), dtype=torch.long)  # each source row's place in the new batch
        where[torch.tensor(order)] = torch.arange(len(order))
        spans, start, width = [], 0, 0
        for rows, cache, mask, positions, last, keep in parts:
            index = torch.tensor(keep, device=device)
            used = mask[index]
            first = int(used.any(0).nonzero()[0])  # columns before it are padding in every kept row
            spans.append((index, first, where[start:start + len(keep)].to(device)))
            width = max(width, mask.shape[1] - first)
            start += len(keep)
        room = max(r.encoded.params["max_new_tokens"] - len(r.tokens) for r in self._live)  # steps before a row ends
        capacity = first_capacity(width, room)  # the merged cache is written into the room it grows in: one copy
        layers = []
        for n in range(len(parts[0][1].layers)):
            keys = values = None
            for (rows, cache, *_), (index, first, to) in zip(parts, spans):
                layer = cache.layers[n]
                if keys is None:
                    shape = (len(order), layer.keys.shape[1], capacity, layer.keys.shape[3])
                    keys, values = layer.keys.new_empty(shape), layer.values.new_empty(shape)
                    keys[:, :, :width].zero_()  # left padding: masked, but must not hold NaN bits
                    values[:, :, :width].zero_()
                length = layer.keys.shape[2] - first
                # index_copy_ of gathered rows: half the time of an advanced-index assignment on CPU
                keys[:, :, width - length:width].index_copy_(0, to, layer.keys[:, :, first:].index_select(0, index))
                values[:, :, width - length:width].index_copy_(0, to, layer.values[:, :, first:].index_select(0, index))
            layers.append((keys, values))
        mask = parts[0][2].new_zeros(len(order), width)
        positions, last = parts[0][3].new_empty(len(order)), parts[0][4].new_empty(len(order))
        for (rows, cache, m, p, t, keep), (index, first, to) in zip(parts, spans):
            mask[to, width - (m.shape[1] - first):] = m[index, first:]
            positions[to], last[to] = p[index], t[index]
        self._cache = cache_over(layers, width)  # a step writes its own positions
        self._mask, self._positions, self._last = mask, positions, last
        self._route = Route(torch.tensor([r.slot for r in self._live], dtype=torch.long, device=device))
        self.max_rows = max(self.max_rows, len(self._live))
        self.max_adapters = max(self.max_adapters, len({r.slot for r in self._live}))

    def summary(self) -> dict:
        """The engine's counters (for /v1/stats)."""
        return {"steps": self.steps, "rows_started": self.rows_started, "rows_joined": self.rows_joined,
                "rows_cancelled": self.rows_cancelled,
                "live_rows": self.live_rows, "max_step_rows": self.max_rows,
                "max_step_adapters": self.max_adapters}

    def _fail_all(self, error: Exception, new: list[_Live]) -> None:
        """A failed model call: every live row and newcomer not done gets `internal`; a device
        failure breaks the engine."""
        logger.exception("a decoding step over %d rows failed", len(self._live))
        message = str(error)
        if isinstance(error, RuntimeError) and ("CUDA error" in message or "device-side" in message):
            self.broken = error
        rows = [r for r in {id(r): r for r in [*self._live, *new]}.values() if not r.done]
        self._live, self._finished = [], 0
        self._cache = self._mask = self._positions = self._last = self._route = None
        for row in rows:
            self.runtime.release(row.pins)
            if not row.request.cancelled:
                _report_error(row.request, f"internal: {type(error).__name__}: {message}")


def _report_error(request: RowRequest, error: str) -> None:
    """Send a row's error as its final report."""
    if not request.cancelled:
        request.sink({"final": {"generated_text": None, "num_input_tokens": None, "num_generated_tokens": None,
                                "finish_reason": None, "error": error, "adapter_version": None}})


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def _ids(tokens: list[int], device: torch.device) -> torch.Tensor:
    """A row's tokens as input_ids [1, T]."""
    return torch.tensor([tokens], dtype=torch.long, device=device)


def _cache_of(output: Any) -> DynamicCache:
    """The key/value cache a model call returned (`cache`, or `past_key_values` before 5.2x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
