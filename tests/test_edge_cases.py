"""Edge cases of mixed batches, one issue per test, each row checked against the oracle
(PEFT alone, one row at a time): empty and all-base batches, fast paths, fan-out, bad
ids, per-row errors, failed model calls, pass-through columns, per-row parameters, stop
strings, threads and adapter capacity."""

from __future__ import annotations

import functools
import gc
import random
import shutil
import struct
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

import oracle
from actors import Predictor
from actors.layers import current_route
from testkit.adapters import save_adapter
from testkit.data import SENTENCES, jpeg_bytes, png_bytes

FORMATS = ["pyarrow", "pandas", "pandas-nullable", "numpy"]  # pandas-nullable: Int64/string dtypes, pd.NA
GEN = {"max_new_tokens": 3, "seed": 11}  # options of the shared generate Predictor


@functools.lru_cache(maxsize=16)
def _predictor(model: str, store: str, task: str, **options) -> Predictor:
    return Predictor(model=model, adapters=store, task=task, **options)


def _fixture(request, task):
    name = {"generate": "llama", "classify": "bert", "embed": "bert_embed", "classify-image": "vit"}[task]
    model, store = request.getfixturevalue(name)
    return model, store, _predictor(model, store, task, **(GEN if task == "generate" else {}))


def _to(fmt: str, table: pa.Table):
    """`table` in one of Ray Data's batch formats."""
    if fmt.startswith("pandas"):
        return table.to_pandas().convert_dtypes() if fmt == "pandas-nullable" else table.to_pandas()
    if fmt == "numpy":
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return table


def _py(value):
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _records(fmt: str, out) -> list[dict]:
    """Rows of a result batch as plain Python dicts (nulls as None)."""
    if fmt == "pyarrow":
        return out.to_pylist()
    if fmt.startswith("pandas"):
        return pa.Table.from_pandas(out, preserve_index=False).to_pylist()
    n = len(next(iter(out.values())))
    return [{c: _py(v[i]) for c, v in out.items()} for i in range(n)]


def _assert_oracle(row: dict, model: str, store: str, task: str, value, **gen) -> None:
    """The row succeeded and equals PEFT alone on its adapter (base for None / "")."""
    assert row["error"] is None, row
    adapter = row["adapter_id"] or None
    if task == "generate":
        n_new = gen.pop("max_new_tokens", GEN["max_new_tokens"])
        expected = oracle.generate(model, store, adapter, value, n_new, seed=GEN["seed"], **gen)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
        assert row["num_input_tokens"] == len(oracle.processor(model, task)(value)["input_ids"])
    elif task == "embed":
        oracle.assert_close(row["embedding"], oracle.embedding(model, store, adapter, value), what=str(adapter))
    else:
        expected = oracle.scores(model, store, adapter, task, value)
        oracle.assert_close(row["scores"], expected, what=str(adapter))
        assert row["label_id"] == int(np.argmax(expected))


OUTPUTS = {"generate": ["generated_text", "num_input_tokens", "num_generated_tokens", "finish_reason"],
           "classify": ["label", "label_id", "scores"], "classify-image": ["label", "label_id", "scores"],
           "embed": ["embedding"]}


def _assert_failed(row: dict, kind: str, task: str) -> None:
    assert row["error"] is not None and row["error"].startswith(f"{kind}:"), row
    assert all(row[name] is None for name in OUTPUTS[task]), row


def _check_rows(rows: list, model: str, store: str, task: str, values: list, kind=None, n_new=None) -> None:
    """Each row failed with `kind(row)` when that is set, else equals the oracle on values[k]."""
    kind_of = (lambda row: kind[row["k"]]) if isinstance(kind, list) else kind or (lambda row: None)
    for row in rows:
        if kind_of(row):
            _assert_failed(row, kind_of(row), task)
        else:
            gen = {"max_new_tokens": n_new[row["k"]]} if n_new else {}
            _assert_oracle(row, model, store, task, values[row["k"]], **gen)


def _call(predictor, task: str, values: list, adapters: list, fmt: str = "pyarrow", **extra) -> list[dict]:
    """Run one batch built by `_input_table` in format `fmt`; its rows as dicts."""
    return _records(fmt, predictor(_to(fmt, _input_table(task, values, adapters, **extra))))


def _spy_calls(monkeypatch, predictor) -> list[tuple]:
    """Record (rows, uniform slot, distinct slots) of every model call."""
    calls, real = [], predictor.task.run

    def run(rows):
        route = current_route()
        calls.append((len(rows), route.uniform, frozenset(route.distinct)))
        return real(rows)

    monkeypatch.setattr(predictor.task, "run", run)
    return calls


def _unknown(row: dict, unknown: list) -> str | None:
    return "unknown_adapter" if row["adapter_id"] in unknown else None


def _input_table(task: str, values: list, adapters: list, **extra) -> pa.Table:
    column = {"generate": "prompt", "classify-image": "image"}.get(task, "text")
    kind = pa.binary() if task == "classify-image" else pa.string()
    return pa.table({column: pa.array(values, kind), "adapter_id": pa.array(adapters, pa.string()),
                     "k": list(range(len(values))), **extra})


# --- empty, base-only and single-adapter batches ---------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", ["generate", "classify", "embed", "classify-image"])
def test_empty_batch_returns_no_rows_with_output_columns(request, monkeypatch, task, fmt):
    _, _, predictor = _fixture(request, task)
    calls = _spy_calls(monkeypatch, predictor)
    out = predictor(_to(fmt, _input_table(task, [], [])))
    names = ["adapter_id", *predictor.task.output_schema.names, "error", "k"]
    columns = out.column_names if fmt == "pyarrow" else list(out) if fmt == "numpy" else list(out.columns)
    assert set(names) <= set(columns) and len(_records(fmt, out)) == 0 and calls == []
    if fmt == "pyarrow":
        schema = predictor.task.output_schema
        assert [out.schema.field(n).type for n in schema.names] == schema.types


@pytest.mark.parametrize("task", ["generate", "classify"])
def test_all_base_batch_equals_bare_model_without_adapter_math(request, monkeypatch, task):
    model, store, predictor = _fixture(request, task)
    deltas = []
    monkeypatch.setattr("actors.layers._LowRankBase._add_delta", lambda *a: deltas.append(1) or 1 / 0)
    calls = _spy_calls(monkeypatch, predictor)
    values = [SENTENCES[i][: 9 + 7 * i] for i in range(6)]
    out = _call(predictor, task, values, [None, "", None, "", "", None])
    _check_rows(out, model, store, task, values)
    assert [r["adapter_id"] for r in sorted(out, key=lambda r: r["k"])] == [None, "", None, "", "", None]
    assert deltas == [] and all(distinct == frozenset() for _, _, distinct in calls)


def test_without_a_store_base_rows_run_and_named_rows_are_unknown(bert, monkeypatch):
    model, store = bert
    predictor = _predictor(model, None, "classify")
    calls, texts = _spy_calls(monkeypatch, predictor), SENTENCES[:4]
    out = _call(predictor, "classify", texts, ["head-a", "head-b", "head-a", "x"])
    _check_rows(out, model, store, "classify", texts, lambda row: "unknown_adapter")
    assert calls == []  # nothing to run
    _check_rows(_call(predictor, "classify", texts, [None, "", "head-a", None]), model, store, "classify", texts,
                lambda row: _unknown(row, ["head-a"]))


UNIFORM = [("classify", a) for a in ("head-a", "head-b", "no-head", "vera")] + \
    [("generate", "lora-emb-head"), ("generate", "vera")]  # embeddings + lm_head, and VeRA


@pytest.mark.parametrize(("task", "adapter"), UNIFORM)
def test_one_adapter_for_every_row_takes_the_uniform_path(request, monkeypatch, task, adapter):
    model, store, predictor = _fixture(request, task)
    calls = _spy_calls(monkeypatch, predictor)
    values = [SENTENCES[i][: 5 + 8 * i] for i in range(5)]
    _check_rows(_call(predictor, task, values, [adapter] * 5), model, store, task, values)
    assert [(n, uniform is not None, len(d)) for n, uniform, d in calls] == [(5, True, 1)]


# --- fan-out, unknown and invalid ids --------------------------------------------------

FAN_OUT = [["head-a", "head-b"], ["no-head", "no-head"], [], None, ["vera", None, ""], ["nope", "head-a"]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fan_out_rows_yield_one_row_per_named_adapter(bert, fmt):
    model, store = bert
    texts = [SENTENCES[i][: 12 + 6 * i] for i in range(len(FAN_OUT))]
    table = pa.table({"text": texts, "adapter_ids": pa.array(FAN_OUT, pa.list_(pa.string())), "k": range(len(texts))})
    out = _records(fmt, _predictor(model, store, "classify")(_to(fmt, table)))
    assert len(out) == sum(max(1, len(ids or [])) for ids in FAN_OUT) == 11
    expected = sorted((k, a or "") for k, ids in enumerate(FAN_OUT) for a in (ids or [None]))
    assert sorted((r["k"], r["adapter_id"] or "") for r in out) == expected
    assert "adapter_ids" not in out[0]
    _check_rows(out, model, store, "classify", texts, lambda row: _unknown(row, ["nope"]))


BAD_IDS = ["nope", "../head-a", "head-a/..", "a/b", "/etc", " ", ".", "..", "HEAD-A", "head-a ", "x" * 200]


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_and_invalid_ids_fail_alone_and_base_ids_pass_through(bert, fmt):
    model, store = bert
    adapters = [*BAD_IDS, None, "", "head-b"]
    texts = [SENTENCES[i] for i in range(len(adapters))]
    out = _call(_predictor(model, store, "classify"), "classify", texts, adapters, fmt)
    assert [r["adapter_id"] for r in sorted(out, key=lambda r: r["k"])] == adapters
    _check_rows(out, model, store, "classify", texts, lambda row: _unknown(row, BAD_IDS))
    assert all(repr(r["adapter_id"]) in r["error"] for r in out if r["adapter_id"] in BAD_IDS)


# --- per-row errors --------------------------------------------------------------------

def _tokens(model: str, task: str, n: int) -> str:
    """A text that the model's tokenizer turns into exactly `n` ids (specials included)."""
    tok = oracle.processor(model, task)
    return next(t for t in (" the" * (n - 1), "a " * (n - 2)) if len(tok(t)["input_ids"]) == n)


def test_generate_row_errors_leave_other_rows_intact(llama):
    model, store = llama
    fits, over = _tokens(model, "generate", 125), _tokens(model, "generate", 126)  # context 128, 3 new tokens
    rows = [  # (prompt, max_new_tokens, temperature, error kind or None)
        ("hello there", None, None, None), (None, None, None, "empty_input"), ("", None, None, "empty_input"),
        (over, None, None, "too_long"), (fits, None, None, None), (fits, 4, None, "too_long"),
        ("the cat", 0, None, "bad_parameter"), ("the cat", -1, None, "bad_parameter"),
        ("the cat", 1.5, None, "bad_parameter"), ("the cat", None, -1.0, "bad_parameter"),
        ("the cat", None, float("inf"), "bad_parameter"), ("we went to", 2, 0.0, None),
    ]
    adapters = ["lora-rs", "vera", None, "lora-qv"] * 3
    table = _input_table("generate", [r[0] for r in rows], adapters,
                         max_new_tokens=pa.array([r[1] for r in rows], pa.float64()),
                         temperature=pa.array([r[2] for r in rows], pa.float64()))
    out = _predictor(model, store, "generate", **GEN)(table).to_pylist()
    assert len(out) == len(rows)
    _check_rows(out, model, store, "generate", [r[0] for r in rows], [r[3] for r in rows],
                [int(r[1] or GEN["max_new_tokens"]) if not r[3] else None for r in rows])


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_text_over_the_context_is_too_long(request, task):
    model, store, predictor = _fixture(request, task)
    texts = [_tokens(model, task, 128), _tokens(model, task, 129), None, "fine"]
    adapter = predictor.adapter_ids[0]
    out = _call(predictor, task, texts, [adapter, adapter, None, adapter])
    _check_rows(out, model, store, task, texts, [None, "too_long", "empty_input", None])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares a huge size (a decompression bomb) and has no pixel data."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = (struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in (ihdr, b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def test_image_row_errors_leave_other_rows_intact(vit):
    model, store = vit
    images = [png_bytes(1), b"garbage bytes", b"", None, png_bytes(2)[:60], jpeg_bytes(3)[:200],
              _png_header(20000, 20000), jpeg_bytes(4)]
    kinds = [None, "bad_image", "empty_input", "empty_input", "bad_image", "bad_image", "bad_image", None]
    adapters = ["vit-a", "vit-b", None, "vit-a", "", "vit-b", "vit-a", "vit-b"]
    out = _call(_predictor(model, store, "classify-image"), "classify-image", images, adapters)
    assert len(out) == len(images)
    _check_rows(out, model, store, "classify-image", images, kinds)


# --- a failed model call leaves nothing behind -----------------------------------------

def _fail_calls(monkeypatch, module, which) -> list[int]:
    """Make `module`'s forward raise on the calls whose number (from 1) `which` accepts."""
    count, real = [], module.forward

    def forward(*args, **kwargs):
        count.append(1)
        if which(len(count)):
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return count


def _idle(predictor) -> bool:
    """No route left set in this thread and no adapter slot pinned."""
    return current_route() is None and not any(predictor.runtime._pins.values())


def _snapshot(predictor) -> dict:
    """Every weight of the model and of the runtime's adapter slots."""
    state = {k: v.clone() for k, v in predictor.task.model.state_dict().items()}
    for name, layer in predictor.runtime._lowrank.items():
        state.update({f"{name}.A": layer.A.clone(), f"{name}.B": layer.B.clone()})
    return state


def _unchanged(before: dict, predictor) -> bool:
    after = _snapshot(predictor)
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_failed_model_call_mid_generation_leaves_the_model_as_it_was(llama, monkeypatch):
    model, store = llama
    predictor = _predictor(model, store, "generate", **GEN)
    prompts = [SENTENCES[i][: 8 + 4 * i] for i in range(6)]
    first = ["lora-qv", "vera", None, "lora-rs", "lora-qv", "lora-emb-head"]
    before, mlp = _snapshot(predictor), predictor.task.model.model.layers[1].mlp
    calls = _fail_calls(monkeypatch, mlp, lambda n: n == 2)  # the first decoding step of the first call
    _check_rows(_call(predictor, "generate", prompts, first), model, store, "generate", prompts)  # retried alone
    assert len(calls) > 2 and _idle(predictor) and _unchanged(before, predictor)
    monkeypatch.undo()
    second = ["lora-pattern", None, "lora-layers", "lora-regex-bias", "vera", "lora-qv"]  # same size, other routing
    _check_rows(_call(predictor, "generate", prompts, second), model, store, "generate", prompts)


def test_model_that_always_fails_gives_internal_errors_then_recovers(bert, monkeypatch):
    model, store = bert
    predictor = _predictor(model, store, "classify")
    texts = [SENTENCES[i] for i in range(5)]
    adapters = ["head-a", "vera", None, "head-b", "no-head"]
    before = _snapshot(predictor)
    _fail_calls(monkeypatch, predictor.task.model.bert.encoder.layer[1], lambda n: True)
    out = _call(predictor, "classify", texts, adapters)
    _check_rows(out, model, store, "classify", texts, lambda row: "internal")
    assert all("RuntimeError: injected failure" in row["error"] for row in out)
    assert _idle(predictor) and _unchanged(before, predictor)
    monkeypatch.undo()
    _check_rows(_call(predictor, "classify", texts, adapters[::-1]), model, store, "classify", texts)


# --- pass-through columns and per-row parameters ---------------------------------------

def _pass_through_table() -> pa.Table:
    meta = pa.array([{"a": i, "b": f"m{i}"} for i in range(4)], pa.struct([("a", pa.int64()), ("b", pa.string())]))
    return pa.table({"text": SENTENCES[:4], "k": pa.array(range(4), pa.int64()),
                     "score": pa.array([0.5, -1.25, 2.0, 3.5], pa.float64()), "name": ["w", "x", "y", "z"],
                     "tags": pa.array([[1, 2], [], [3], [4, 5, 6]], pa.list_(pa.int64())), "meta": meta,
                     "image": pa.array([b"\x89", None, b"", b"z"], pa.binary()),  # not this task's input
                     "adapter_ids": pa.array([["head-a", "vera"], None, ["no-head"], ["head-b", "head-b"]])})


@pytest.mark.parametrize("fmt", FORMATS)
def test_pass_through_columns_keep_values_and_types(bert, fmt):
    model, store = bert
    table = _pass_through_table()
    batch = _to(fmt, table)
    out = _predictor(model, store, "classify")(batch)
    columns = ["k", "score", "name", "tags", "meta", "image"]
    if fmt == "pyarrow":
        assert [out.schema.field(c).type for c in columns] == [table.schema.field(c).type for c in columns]
    else:
        assert [out[c].dtype for c in columns] == [batch[c].dtype for c in columns]
    expected = table.to_pylist()
    rows = _records(fmt, out)
    assert len(rows) == 6
    for row in rows:
        source = expected[row["k"]]
        assert {c: row[c] for c in columns} == {c: source[c] for c in columns}
        _assert_oracle(row, model, store, "classify", source["text"])


@pytest.mark.parametrize("fmt", ["pyarrow", "pandas"])
def test_row_max_new_tokens_and_temperature_override_the_defaults(llama, fmt):
    import pandas as pd

    model, store = llama
    n_new = [1, None, 2, 5, None, 4]
    temperature = [None, 0.0, None, 0.8, 1.3, None]
    prompts = [SENTENCES[i][:20] for i in range(6)]
    adapters = ["lora-qv", "vera", None, "lora-rs", "lora-qv", ""]
    table = _input_table("generate", prompts, adapters, temperature=pa.array(temperature, pa.float64()),
                         max_new_tokens=pa.array(n_new, pa.int64()))
    batch = table.to_pandas() if fmt == "pandas" else table
    if fmt == "pandas":  # a nullable integer column holds pd.NA
        batch["max_new_tokens"] = pd.array(n_new, dtype="Int64")
    for row in _records(fmt, _predictor(model, store, "generate", **GEN)(batch)):
        k = row["k"]
        _assert_oracle(row, model, store, "generate", prompts[k], max_new_tokens=n_new[k] or GEN["max_new_tokens"],
                       temperature=temperature[k] or 0.0)


def _oracle_tokens(model: str, store: str, adapter, prompt: str, n_new: int) -> list[int]:
    """Greedy new token ids of PEFT alone (no stop strings)."""
    tok, peft_model = oracle.processor(model, "generate"), oracle.oracle_model(model, store, adapter, "generate")
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc.input_ids.shape[1]:].tolist()


def test_stop_strings_cut_the_text_before_the_stop(llama):
    model, store = llama
    tok = oracle.processor(model, "generate")
    prompts, adapters = [SENTENCES[i][:16] for i in range(4)], ["lora-qv", None, "vera", "lora-rs"]
    tokens = [_oracle_tokens(model, store, a, p, 8) for a, p in zip(adapters, prompts)]
    text = tok.decode(tokens[0], skip_special_tokens=True)
    start = next(i for i in range(1, len(text) - 2) if text.find(text[i: i + 2]) == i and text[i: i + 2].strip())
    stop = text[start: start + 2]  # first seen mid-text in row 0's own greedy output
    predictor = Predictor(model=model, adapters=store, task="generate", max_new_tokens=8, stop=[stop])
    out = _call(predictor, "generate", prompts, adapters)
    for row in out:
        new = tokens[row["k"]]
        full = tok.decode(new, skip_special_tokens=True)
        if stop in full:
            cut = next(k for k in range(1, len(new) + 1) if stop in tok.decode(new[:k], skip_special_tokens=True))
            expected = (full[: full.find(stop)], cut, "stop")
        else:
            expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], 8)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
    assert out[[r["k"] for r in out].index(0)]["generated_text"] == text[:start]


# --- threads and capacity --------------------------------------------------------------

def _in_threads(predictor, batches: list, check, rounds: int) -> None:
    """Call `predictor` on each batch in its own thread, `rounds` times, all starting at once;
    `check` every result (a thread's failure is re-raised here)."""
    barrier = threading.Barrier(len(batches))

    def work(batch):
        barrier.wait()
        for _ in range(rounds):
            check(predictor(batch).to_pylist())

    with ThreadPoolExecutor(len(batches)) as pool:
        for future in [pool.submit(work, batch) for batch in batches]:
            future.result()


THREAD_MIXES = {
    "classify": [["head-a", "no-head", None, "head-a"] * 2, ["head-b", "vera", "", "vera"] * 2],
    "generate": [["lora-qv", None, "vera", "lora-qv"], ["lora-rs", "lora-emb-head", "", "lora-pattern"]],
}


@pytest.mark.parametrize(("task", "capacity"), [("classify", None), ("classify", 2), ("generate", None)])
def test_two_threads_on_one_predictor_get_their_own_routing(request, task, capacity):
    model, store, predictor = _fixture(request, task)
    if capacity:  # slots pinned by one thread make the other wait, never evict
        predictor = Predictor(model=model, adapters=store, task=task, max_loaded_adapters=capacity)
    mixes = THREAD_MIXES[task]
    values = [SENTENCES[i][: 10 + 3 * i] for i in range(len(mixes[0]))]

    batches = [_input_table(task, values, mix) for mix in mixes]
    check = functools.partial(_check_rows, model=model, store=store, task=task, values=values)
    _in_threads(predictor, batches, check, rounds=4 if task == "classify" else 2)
    assert _idle(predictor)


@pytest.fixture(scope="module")
def bert6(bert, tmp_path_factory):
    """(model, store): the BERT store's four adapters plus two more (one on the embeddings)."""
    model, store = bert
    root = tmp_path_factory.mktemp("bert6")
    for name in ("head-a", "head-b", "no-head", "vera"):
        shutil.copytree(f"{store}/{name}", root / name)
    for seed, (name, targets) in enumerate({"head-c": ["query", "key"], "emb": ["word_embeddings", "value"]}.items()):
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets,
                            modules_to_save=["classifier"])
        save_adapter(model, root, name, config, model_class=AutoModelForSequenceClassification, seed=20 + seed,
                     save_embedding_layers="auto")
    return model, str(root)


def _stacked_size(predictor) -> int:
    """Elements of every routed layer's stacked per-slot tensors."""
    layers = predictor.runtime._lowrank.values()
    return sum(t.numel() for layer in layers for t in (layer.A, layer.B, layer.bias) if t is not None)


def _track_head_copies(monkeypatch, predictor) -> list:
    """Weak references to every head copy the runtime makes from now on."""
    refs, real = [], predictor.runtime._head_copy

    def head_copy(name, state):
        head = real(name, state)
        if head is not None:
            refs.append(weakref.ref(head))
        return head

    monkeypatch.setattr(predictor.runtime, "_head_copy", head_copy)
    return refs


def test_capacity_splits_batches_and_churn_stays_flat(bert6, monkeypatch):
    model, store = bert6
    predictor = Predictor(model=model, adapters=store, task="classify", max_loaded_adapters=2)
    ids = predictor.adapter_ids
    assert len(ids) == 6 and len(predictor.runtime.loaded_ids) == 2
    calls, copies = _spy_calls(monkeypatch, predictor), _track_head_copies(monkeypatch, predictor)
    texts = [SENTENCES[i % len(SENTENCES)][: 8 + i] for i in range(14)]
    _check_rows(_call(predictor, "classify", texts, [*ids, *ids, None, ""]), model, store, "classify", texts)
    assert all(len(distinct) <= 2 for _, _, distinct in calls)  # split by capacity, not row by row:
    assert 3 <= len(calls) <= 7 and sum(n for n, _, _ in calls) == 14
    stacked, rng = _stacked_size(predictor), random.Random(5)
    for _ in range(10):
        adapters = [rng.choice([*ids, None]) for _ in range(6)]
        _check_rows(_call(predictor, "classify", texts[:6], adapters), model, store, "classify", texts)
        assert len(predictor.runtime.loaded_ids) <= 2 and _stacked_size(predictor) == stacked
    gc.collect()
    alive = [ref for ref in copies if ref() is not None]
    assert len(copies) > 6 and len(alive) <= 2  # one head module (classifier), two slots


def test_non_string_adapter_ids_are_unknown_not_base(bert):
    import pandas as pd

    model, store = bert
    p = Predictor(model=model, adapters=store, task="classify", canary=False)
    out = p(pd.DataFrame({"text": ["a fine day", "a fine day"], "adapter_id": [0, 7]}))
    assert list(out["adapter_id"]) == ["0", "7"]
    assert all(e.startswith("unknown_adapter:") for e in out["error"])


def test_rows_over_the_context_warn_nothing_and_loading_draws_no_bar(llama, bert, tmp_path, capfd):
    """A too_long row is refused, so the tokenizer's "sequence length is longer than the
    specified maximum" warning would only mislead; loading draws no "Loading weights" bar."""
    import json

    folder = shutil.copytree(bert[0], tmp_path / "bert")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 64  # the tokenizer warns past it (the model's context is 128)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    import logging

    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = records.append
    hf = logging.getLogger("transformers")
    level = hf.level
    hf.addHandler(catcher)
    hf.setLevel(logging.WARNING)  # the suite runs with TRANSFORMERS_VERBOSITY=error
    try:
        for model, task, column in ((llama[0], "generate", "prompt"), (str(folder), "classify", "text")):
            p = Predictor(model=model, task=task, canary=False)
            row = p(pa.table({column: ["word " * 600]})).to_pylist()[0]
            assert row["error"].startswith("too_long:")
    finally:
        hf.removeHandler(catcher)
        hf.setLevel(level)
    assert not [r for r in records if "sequence length is longer" in r.getMessage()]
    assert "Loading weights" not in capfd.readouterr().err
