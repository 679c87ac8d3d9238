"""The continuous batcher (`actors/engine.py`) against PEFT alone: rows that join a running
batch at a later step, of every adapter kind the session stores hold (LoRA of many shapes,
VeRA, prompt and prefix tuning, GPT-2's Conv1D), sampled rows, the model's repetition
penalty, stop strings, streamed text, logprobs, cancellation and adapters that must wait for
a slot. Each row's answer must be PEFT's for that row with only its adapter loaded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import oracle
from actors.engine import DROP_FRACTION, JOIN_RATIO, MAX_HELD_STEPS, DecodeEngine, RowRequest, _held_back
from actors.predictor import Predictor
from testkit.data import SENTENCES

TIMEOUT = 120


class Rows:
    """Rows submitted to an engine; collects each row's reports."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self.reports: list[list[dict]] = []
        self._done: list[threading.Event] = []
        self.requests: list[RowRequest] = []

    def submit(self, value, adapter, max_new_tokens: int, temperature: float | None = None, **kw) -> int:
        """Queue one row (`kw`: RowRequest's options); its index."""
        index, done, reports = len(self.reports), threading.Event(), []
        self.reports.append(reports)
        self._done.append(done)

        def sink(report: dict) -> None:
            reports.append(report)
            if "final" in report:
                done.set()

        params = {"max_new_tokens": max_new_tokens, **({} if temperature is None else {"temperature": temperature})}
        request = RowRequest(value, adapter, sink, params, **kw)
        self.requests.append(request)
        self.engine.submit(request)
        return index

    def final(self, index: int) -> dict:
        assert self._done[index].wait(TIMEOUT), f"row {index} never finished"
        return self.reports[index][-1]["final"]

    def outcome(self, index: int) -> tuple:
        row = self.final(index)
        assert row["error"] is None, row
        return row["generated_text"], row["num_generated_tokens"], row["finish_reason"]


def _wait_for_steps(engine: DecodeEngine, steps: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while engine.steps < steps:
        assert time.monotonic() < deadline, "the engine stopped stepping"
        time.sleep(0.001)


def _staggered(engine: DecodeEngine, first: list[tuple], later: list[tuple], after_steps: int = 2) -> Rows:
    """Submit `first` (value, adapter, max_new_tokens), then `later` once the engine ran
    `after_steps` more decoding steps: they join a running batch."""
    rows = Rows(engine)
    start = engine.steps
    for value, adapter, n in first:
        rows.submit(value, adapter, n)
    _wait_for_steps(engine, start + after_steps)
    joined = engine.rows_joined
    for value, adapter, n in later:
        rows.submit(value, adapter, n)
    for i in range(len(first) + len(later)):
        rows.final(i)
    assert engine.rows_joined > joined, "no row joined a running batch: the test would not see a merge bug"
    return rows


@pytest.fixture(scope="module")
def llama_engine(llama):
    model, store = llama
    predictor = Predictor(model=model, adapters=store, task="generate", max_new_tokens=12)
    return DecodeEngine(predictor, 16)


def test_rows_joining_a_running_batch_equal_peft(llama, llama_engine):
    """Every adapter and the base start together; more rows of every adapter join two steps
    later, with other prompt lengths (the cache is re-padded) and other lengths to generate
    (rows leave at different steps)."""
    model, store = llama
    names = [*sorted(p.name for p in Path(store).iterdir()), None]
    first = [(SENTENCES[i][: 6 + 5 * i], a, 12) for i, a in enumerate(names)]
    later = [(SENTENCES[(i + 3) % len(SENTENCES)][: 40 - 3 * i], a, 3 + i) for i, a in enumerate(reversed(names))]
    rows = _staggered(llama_engine, first, later)
    for i, (prompt, adapter, n) in enumerate(first + later):
        assert rows.outcome(i) == oracle.generate(model, store, adapter, prompt, n), (adapter, prompt)
        assert rows.final(i)["num_input_tokens"] == len(oracle.processor(model, "generate")(prompt).input_ids)
    assert llama_engine.summary()["max_step_adapters"] >= len(names)
    assert llama_engine.live_rows == 0 and sum(llama_engine.runtime._pins.values()) == 0


def _prefill_steps(engine: DecodeEngine) -> list[tuple[int, int]]:
    """(engine.steps, rows) at each of the engine's prefills from now on."""
    seen, prefill = [], engine._prefill

    def recording(new):
        seen.append((engine.steps, len(new)))
        return prefill(new)

    engine._prefill = recording
    return seen


def test_newcomers_beside_a_full_batch_join_in_groups(llama):
    """Beside 16 live rows, one newcomer (fewer than 16 / JOIN_RATIO) is held for
    MAX_HELD_STEPS steps, then joins; two newcomers join at once. Every row is PEFT's."""
    model, store = llama
    engine = DecodeEngine(Predictor(model=model, adapters=store, task="generate", max_new_tokens=40), 32)
    names = [*sorted(p.name for p in Path(store).iterdir()), None]
    live = [(SENTENCES[i % len(SENTENCES)][: 8 + i], names[i % len(names)], 40) for i in range(16)]
    assert 1 * JOIN_RATIO < len(live) <= 2 * JOIN_RATIO
    rows = Rows(engine)
    for value, adapter, n in live:
        rows.submit(value, adapter, n)
    _wait_for_steps(engine, 2)
    assert engine.live_rows == len(live)
    prefills = _prefill_steps(engine)
    lone = (SENTENCES[0][:11], names[0], 5)
    start = engine.steps
    rows.submit(*lone)
    rows.final(len(live))
    assert len(prefills) == 1 and prefills[0][0] >= start + MAX_HELD_STEPS, (prefills, start)
    pair = [(SENTENCES[1][:13], names[1], 4), (SENTENCES[2][:7], None, 4)]
    start = engine.steps
    for row in pair:
        rows.submit(*row)
    rows.final(len(live) + 2)
    assert prefills[1][0] < start + MAX_HELD_STEPS and sum(n for _, n in prefills[1:]) == 2, (prefills, start)
    for i, (prompt, adapter, n) in enumerate(live + [lone] + pair):
        assert rows.outcome(i) == oracle.generate(model, store, adapter, prompt, n), (adapter, prompt)


def test_rows_that_finish_early_report_once_while_kept_in_the_batch(llama):
    """Finished rows stay in the batch's tensors (up to DROP_FRACTION of it) while the others
    decode on: a streamed row reports its deltas, then one final, then nothing; a sampled
    row beside them keeps its own draws; every row is PEFT's."""
    model, store = llama
    engine = DecodeEngine(Predictor(model=model, adapters=store, task="generate", max_new_tokens=12, seed=3), 16)
    names = [*sorted(p.name for p in Path(store).iterdir()), None]
    short = [(SENTENCES[i][:10 + i], names[i % len(names)], 2) for i in range(2)]
    long = [(SENTENCES[(i + 2) % len(SENTENCES)][:9 + i], names[(i + 2) % len(names)], 12) for i in range(9)]
    assert len(short) <= DROP_FRACTION * (len(short) + len(long))
    rows = Rows(engine)
    for value, adapter, n in short:
        rows.submit(value, adapter, n, stream=True, logprobs=1)
    for value, adapter, n in long[:-1]:
        rows.submit(value, adapter, n)
    rows.submit(*long[-1], temperature=0.8, seed=5)
    for i in range(len(short) + len(long)):
        rows.final(i)
    for i, (prompt, adapter, n) in enumerate(short + long):
        temperature, seed = (0.8, 5) if i == len(short) + len(long) - 1 else (0.0, None)
        expected = oracle.generate(model, store, adapter, prompt, n, temperature=temperature, seed=seed)
        assert rows.outcome(i) == expected, (adapter, prompt)
    for i in range(len(short)):
        finals = [r for r in rows.reports[i] if "final" in r]
        assert len(finals) == 1 and "final" in rows.reports[i][-1]
        assert len(finals[0]["final"]["logprobs"]) == finals[0]["final"]["num_generated_tokens"]


def test_a_chat_row_without_a_template_fails_alone(llama, llama_engine):
    """Chat turns are encoded as the Predictor encodes them: the session Llama has no chat
    template, so that row fails with the Predictor's error and its neighbour finishes."""
    rows = Rows(llama_engine)
    rows.submit([{"role": "user", "content": "hi"}], "lora-qv", 4)
    rows.submit("the cat", "lora-qv", 4)
    assert rows.final(0)["error"].startswith("bad_parameter: the model's tokenizer has no chat template")
    assert rows.outcome(1) == oracle.generate(*llama, "lora-qv", "the cat", 4)


def test_gpt2_rows_join_a_running_batch(gpt2):
    """GPT-2: absolute positions (no position_ids in its cache path), fused Conv1D LoRA."""
    model, store = gpt2
    engine = DecodeEngine(Predictor(model=model, adapters=store, task="generate", max_new_tokens=10), 8)
    first = [(SENTENCES[0][:30], "attn", 10), (SENTENCES[1][:8], None, 10)]
    later = [(SENTENCES[2][:12], "mlp-bias", 6), (SENTENCES[3][:40], "attn", 4)]
    rows = _staggered(engine, first, later)
    for i, (prompt, adapter, n) in enumerate(first + later):
        assert rows.outcome(i) == oracle.generate(model, store, adapter, prompt, n), (adapter, prompt)


def test_prompt_and_prefix_rows_join_a_running_batch(llama, tmp_path):
    """Virtual tokens (prompt tuning) and prefix caches come with a row's prefill; the merged
    cache keeps a prefix row's keys and values beside rows that have none."""
    from peft import PrefixTuningConfig, PromptTuningConfig
    from transformers import AutoModelForCausalLM

    from test_kinds import _store

    model, store = llama
    configs = {"prompt-4": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
               "prefix-3": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}
    prompts = _store(model, tmp_path / "store", AutoModelForCausalLM, configs, {"lora-qv": Path(store) / "lora-qv"})
    engine = DecodeEngine(Predictor(model=model, adapters=prompts, task="generate", max_new_tokens=8), 8)
    first = [(SENTENCES[0][:20], "prefix-3", 8), (SENTENCES[1][:9], "lora-qv", 8)]
    later = [(SENTENCES[2][:14], "prompt-4", 5), (SENTENCES[3][:30], None, 5), (SENTENCES[4][:11], "prefix-3", 4)]
    rows = _staggered(engine, first, later)
    for i, (prompt, adapter, n) in enumerate(first + later):
        assert rows.outcome(i) == oracle.generate(model, prompts, adapter, prompt, n), (adapter, prompt)


def test_sampled_rows_and_the_models_repetition_penalty(llama, tmp_path):
    """A generation_config with a repetition penalty and top_k: greedy rows get the penalty,
    sampled rows draw from their own seeded generator, as PEFT's generate does alone."""
    import json
    import shutil

    plain, store = llama
    model = Path(shutil.copytree(plain, tmp_path / "model"))
    config = model / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "repetition_penalty": 1.3, "top_k": 20}))
    engine = DecodeEngine(Predictor(model=str(model), adapters=store, task="generate", max_new_tokens=8, seed=7), 8)
    rows = Rows(engine)
    cases = [("lora-rs", 0.0, None), ("vera", 0.9, 7), (None, 1.2, 11), ("lora-qv", 0.0, None)]
    for i, (adapter, temperature, seed) in enumerate(cases):
        rows.submit(SENTENCES[i][:15], adapter, 8, temperature, seed=seed)
    for i, (adapter, temperature, seed) in enumerate(cases):
        expected = oracle.generate(plain, store, adapter, SENTENCES[i][:15], 8, temperature=temperature, seed=seed,
                                   top_k=20 if temperature else 0, repetition_penalty=1.3)
        assert rows.outcome(i) == expected, (adapter, temperature)


def test_streamed_text_adds_up_to_the_final_text_and_holds_back_stop_strings(llama, llama_engine):
    model, store = llama
    prompt = SENTENCES[0][:19]
    full = oracle.generate(model, store, None, prompt, 12)[0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip() and stop in full
    rows = Rows(llama_engine)
    rows.submit(prompt, None, 12, stream=True)
    rows.submit(prompt, None, 12, stream=True, stop=[stop])
    rows.submit(prompt, None, 12, stream=False)
    for i, text in enumerate([full, full[: full.find(stop)]]):
        final = rows.final(i)
        deltas = [r["delta"] for r in rows.reports[i][:-1]]
        assert "".join(deltas) + final["delta"] == final["generated_text"] == text
        assert len(deltas) > 1  # it did stream
    assert rows.final(1)["finish_reason"] == "stop"
    assert len(rows.reports[2]) == 1  # a row that does not stream reports once


@pytest.mark.parametrize("text, stop, held", [
    ("the cat sa", ["sat"], 2), ("the cat s", ["sat"], 1), ("the cat", ["sat"], 0), ("abc", ["bcd", "cx"], 2),
    ("abc", [], 0), ("ab", ["abcdef"], 2), ("x", ["x"], 0),
])
def test_held_back_is_the_longest_stop_string_prefix_at_the_end(text, stop, held):
    assert _held_back(text, stop) == held


def test_logprobs_are_the_models_log_softmax(llama, llama_engine):
    """Each chosen token's logprob and its top alternatives are PEFT's log_softmax over the
    prompt and the tokens generated before it."""
    model, store = llama
    rows = Rows(llama_engine)
    rows.submit("we went to", "lora-pattern", 4, logprobs=3)
    rows.submit("we went to", None, 4)  # a neighbour without logprobs
    final = rows.final(0)
    peft = oracle.oracle_model(model, store, "lora-pattern", "generate")
    ids = oracle.processor(model, "generate")("we went to").input_ids
    assert len(final["logprobs"]) == final["num_generated_tokens"] == 4
    for entry in final["logprobs"]:
        with torch.no_grad():
            expected = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        top = expected.topk(3)
        assert entry["id"] == int(expected.argmax())
        assert entry["logprob"] == pytest.approx(float(expected[entry["id"]]), abs=1e-4)
        assert [p for p, _ in entry["top"]] == [oracle.processor(model, "generate").decode([t]) for t in top.indices]
        assert [v for _, v in entry["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids = ids + [entry["id"]]
    assert "logprobs" not in rows.final(1)


def test_a_cancelled_row_leaves_and_unpins_its_adapter(llama):
    """One slot: a long row of one adapter holds it; a row of another adapter waits for it
    (it cannot be routed while the slot is pinned); cancelling the first lets it in."""
    model, store = llama
    engine = DecodeEngine(Predictor(model=model, adapters=store, task="generate", max_new_tokens=100,
                                    max_loaded_adapters=1), 8)
    rows = Rows(engine)
    rows.submit("the cat", "lora-qv", 100)
    _wait_for_steps(engine, 2)
    rows.submit("the dog", "vera", 3)
    steps = engine.steps
    _wait_for_steps(engine, steps + 3)
    assert len(rows.reports[1]) == 0 and engine.live_rows == 1  # waiting for the slot
    rows.requests[0].cancel()
    assert rows.outcome(1) == oracle.generate(model, store, "vera", "the dog", 3)
    assert rows.reports[0] == []  # a cancelled row reports nothing
    deadline = time.monotonic() + TIMEOUT
    while engine.live_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.live_rows == 0 and sum(engine.runtime._pins.values()) == 0


def test_unknown_adapter_fails_its_row_only(llama, llama_engine):
    rows = Rows(llama_engine)
    rows.submit("the cat", "missing", 3)
    rows.submit("the cat", "lora-qv", 3)
    assert rows.final(0)["error"] == "unknown_adapter: adapter 'missing' is not in the adapter store"
    assert rows.outcome(1) == oracle.generate(*llama, "lora-qv", "the cat", 3)


def test_the_engine_refuses_other_tasks(bert):
    with pytest.raises(ValueError, match="continuous batching runs task generate, not 'classify'"):
        DecodeEngine(Predictor(model=bert[0], adapters=bert[1], task="classify"), 4)


def test_a_sliding_window_model_joins_rows_as_generate_does(tmp_path):
    """Qwen2 with a sliding-window layer (window 8, prompts longer): the engine keeps full
    caches and the model's mask applies the window, as PEFT's generate does alone."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from testkit.adapters import save_adapter
    from testkit.models import llama_tokenizer

    tokenizer = llama_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1, initializer_range=0.1,
                         tie_word_embeddings=False, **ids)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    model = str(tmp_path / "model")
    Qwen2ForCausalLM(config).save_pretrained(model)
    tokenizer.save_pretrained(model)
    GenerationConfig(**ids).save_pretrained(model)
    store = str(tmp_path / "store")
    save_adapter(model, store, "a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                              target_modules=["q_proj", "v_proj"]),
                 model_class=AutoModelForCausalLM, seed=1)
    engine = DecodeEngine(Predictor(model=model, adapters=store, task="generate", max_new_tokens=12), 8)
    first = [(SENTENCES[0][:60], "a", 12), (SENTENCES[1][:10], None, 12)]
    later = [(SENTENCES[2][:45], "a", 8), (SENTENCES[3][:70], None, 6)]
    rows = _staggered(engine, first, later)
    for i, (prompt, adapter, n) in enumerate(first + later):
        assert len(oracle.processor(model, "generate")(prompt).input_ids) > 8 or i == 1
        assert rows.outcome(i) == oracle.generate(model, store, adapter, prompt, n), (adapter, prompt)
