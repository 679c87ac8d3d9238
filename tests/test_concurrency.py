"""Adapters added and removed while other threads run model calls: forwards never see a
half-resized layer, an unloaded id is re-read from its folder when loaded again, and an id
that is not published is never loaded for a racing call."""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
import time

import pyarrow as pa
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification

import oracle
from actors import Predictor
from actors.runtime import UnknownAdapterError
from testkit.adapters import save_adapter
from testkit.data import SENTENCES

TARGETS = ["query", "value", "dense"]


def _save(model, folder, name, seed, **kw):
    save_adapter(model, folder, name, LoraConfig(init_lora_weights=False, **kw),
                 model_class=AutoModelForSequenceClassification, seed=seed)


def _forward(p: Predictor, rows, adapters, include_pending=False) -> torch.Tensor:
    """The task's logits for `rows`, each routed to its adapter (None = base)."""
    with p.runtime.acquire([a for a in adapters if a], include_pending) as slots, torch.inference_mode():
        with p.runtime.route([slots.get(a, 0) for a in adapters]):
            return p.task.forward(rows)


@contextlib.contextmanager
def _fast_thread_switches():
    """Switch threads every few microseconds, so races show up within a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def test_forwards_stay_exact_while_larger_adapters_are_added(bert, tmp_path):
    model = bert[0]
    store, later = tmp_path / "store", tmp_path / "later"
    _save(model, store, "small-a", 1, r=2, lora_alpha=4, target_modules=["query", "value"])
    _save(model, store, "small-b", 2, r=4, lora_alpha=4, target_modules=TARGETS)
    grown = [f"big-{k}" for k in range(6)]
    for k, name in enumerate(grown):  # every add grows slots, rank and (once) the bias stacks
        _save(model, later, name, 10 + k, r=6 * (k + 1), lora_alpha=8, target_modules=TARGETS, lora_bias=k == 1)
    p = Predictor(model=model, adapters=str(store), task="classify", canary=False)
    rows = [p.task.encode(SENTENCES[i][: 12 + 9 * i], {}) for i in range(6)]
    mixed = ["small-a", "small-b", None, "small-b", "small-a", None]
    expected = {"mixed": _forward(p, rows, mixed), "uniform": _forward(p, rows, ["small-b"] * 6)}
    failures, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            for kind, adapters in (("mixed", mixed), ("uniform", ["small-b"] * 6)):
                try:
                    diff = (_forward(p, rows, adapters) - expected[kind]).abs().max().item()
                    if not diff <= 1e-5:
                        failures.append(f"{kind}: off by {diff:.3g}")
                except Exception as e:  # noqa: BLE001 - any failure of a racing forward is the bug
                    failures.append(f"{kind}: {type(e).__name__}: {e}")

    with _fast_thread_switches():
        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for name in grown:
                shutil.copytree(later / name, store / name)
                p.load_adapter(name)
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert not failures, failures[:5]
    ids = ["small-a", *grown, "small-b"]
    texts = [SENTENCES[i][: 10 + 5 * i] for i in range(len(ids))]
    for row in p(pa.table({"text": texts, "adapter_id": ids})).to_pylist():
        oracle.assert_close(row["scores"], oracle.scores(model, str(store), row["adapter_id"], "classify",
                                                         row["text"]), what=row["adapter_id"])


@pytest.mark.parametrize("uniform", [True, False])
def test_a_resize_between_a_forwards_reads_does_not_reach_that_forward(monkeypatch, uniform):
    """Deterministic form of the race above: the stacks grow (rank 2 -> 16, a bias stack
    appears) while a forward is between its low-rank matmuls."""
    from actors.adapters import ModuleDelta
    from actors.layers import LowRankLinear, Route, routing

    torch.manual_seed(0)
    layer = LowRankLinear(torch.nn.Linear(8, 5), 8, 5, n_slots=3, rank=2, bias=False)
    layer.assign(1, ModuleDelta(torch.randn(2, 8), torch.randn(5, 2)))
    layer.assign(2, ModuleDelta(torch.randn(2, 8), torch.randn(5, 2)))
    x, slots = torch.randn(4, 3, 8), torch.tensor([1, 1, 1, 1] if uniform else [1, 2, 0, 1])
    with routing(Route(slots)), torch.no_grad():
        expected = layer(x)
        real_bmm, real_matmul, grown = torch.bmm, torch.Tensor.__matmul__, []

        def grow_then(real):
            def op(*args):
                if not grown:
                    grown.append(layer.resize(4, 16, True))  # lands after the forward read A, before B
                return real(*args)
            return op

        monkeypatch.setattr(torch, "bmm", grow_then(real_bmm))
        monkeypatch.setattr(torch.Tensor, "__matmul__", grow_then(real_matmul))
        got = layer(x)
        monkeypatch.undo()
    assert grown and layer.rank == 16 and layer.bias is not None
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _replace_adapter(model, store, name, seed):
    """Overwrite adapter folder `name` with different weights, rank and targets."""
    shutil.rmtree(store / name)
    _save(model, store, name, seed, r=8, lora_alpha=16, target_modules=TARGETS, modules_to_save=["classifier"])
    oracle.oracle_model.cache_clear()


def _scores_match_oracle(p, model, store, adapter) -> None:
    texts = SENTENCES[:3]
    out = p(pa.table({"text": texts, "adapter_id": [adapter] * 3})).to_pylist()
    for row in out:
        assert row["error"] is None, row
        oracle.assert_close(row["scores"], oracle.scores(model, str(store), adapter, "classify", row["text"]),
                            what=adapter)


def test_unload_then_load_rereads_the_folder(bert, tmp_path):
    model = bert[0]
    store = tmp_path / "store"
    _save(model, store, "base-a", 1, r=4, lora_alpha=8, target_modules=["query"])
    _save(model, store, "x", 2, r=2, lora_alpha=4, target_modules=["value"])
    p = Predictor(model=model, adapters=str(store), task="classify")
    _scores_match_oracle(p, model, store, "x")
    p.unload_adapter("x")
    _replace_adapter(model, store, "x", 3)
    p.load_adapter("x")
    _scores_match_oracle(p, model, store, "x")


def test_a_call_racing_an_unload_never_reloads_the_adapter(bert, tmp_path, monkeypatch):
    """A call checked its rows' adapter, then the adapter was unloaded before the call pinned
    it: the call must not read it back into a slot (where a later load would find it and skip
    reading the changed folder)."""
    model = bert[0]
    store = tmp_path / "store"
    _save(model, store, "x", 2, r=2, lora_alpha=4, target_modules=["value"])
    p = Predictor(model=model, adapters=str(store), task="classify", canary=False)
    real = p.runtime.acquire

    @contextlib.contextmanager
    def unload_first(adapter_ids, *args, **kwargs):
        if "x" in p.runtime.adapter_ids:
            p.unload_adapter("x")  # lands between the call's check and its acquire
        with real(adapter_ids, *args, **kwargs) as slots:
            yield slots

    monkeypatch.setattr(p.runtime, "acquire", unload_first)
    out = p(pa.table({"text": ["the cat sat"], "adapter_id": ["x"]})).to_pylist()[0]
    assert out["scores"] is None and "'x' is not in the adapter store" in out["error"]
    assert "x" not in p.runtime.loaded_ids and not p.knows("x")
    monkeypatch.setattr(p.runtime, "acquire", real)
    _replace_adapter(model, store, "x", 3)
    p.load_adapter("x")
    _scores_match_oracle(p, model, store, "x")


def test_an_unpublished_adapter_is_refused_to_racing_calls(bert, tmp_path):
    model = bert[0]
    store = tmp_path / "store"
    _save(model, store, "base-a", 1, r=4, lora_alpha=8, target_modules=["query"])
    p = Predictor(model=model, adapters=str(store), task="classify", canary=False, max_loaded_adapters=1)
    _save(model, store, "late", 2, r=2, lora_alpha=4, target_modules=["value"])
    rows = [p.task.encode("the cat sat", {})]
    p.runtime.add("late", publish=False)
    with pytest.raises(UnknownAdapterError, match="'late' is not in the adapter store"):
        _forward(p, rows, ["late"])
    _forward(p, rows, ["late"], include_pending=True)  # its own load-time check may use it
    p.runtime.remove("late")
    with pytest.raises(UnknownAdapterError):
        _forward(p, rows, ["late"], include_pending=True)
    with pytest.raises(KeyError, match="removed before it was published"):
        p.runtime.publish("late")
    assert "late" not in p.runtime.loaded_ids and not p.knows("late")
    with pytest.raises(UnknownAdapterError):
        _forward(p, rows, ["never-added"])
    p.load_adapter("late")
    _scores_match_oracle(p, model, store, "late")


def test_a_racing_call_waiting_for_a_slot_is_refused_once_its_adapter_is_removed(bert, tmp_path):
    """With every slot pinned, a call waits; if its adapter is removed meanwhile, it is
    refused when it wakes instead of loading the removed adapter."""
    model = bert[0]
    store = tmp_path / "store"
    _save(model, store, "held", 1, r=4, lora_alpha=8, target_modules=["query"])
    _save(model, store, "waiting", 2, r=2, lora_alpha=4, target_modules=["value"])
    p = Predictor(model=model, adapters=str(store), task="classify", canary=False, max_loaded_adapters=1)
    errors, started = [], threading.Event()

    def wait_for_slot():
        started.set()
        try:
            with p.runtime.acquire(["waiting"]):
                errors.append(None)
        except UnknownAdapterError as e:
            errors.append(e)

    with p.runtime.acquire(["held"]):  # the only slot, pinned
        thread = threading.Thread(target=wait_for_slot)
        thread.start()
        started.wait()
        deadline = time.monotonic() + 30
        while not p.runtime._lock._waiters and time.monotonic() < deadline:  # until it waits for the slot
            time.sleep(0.001)
        p.runtime.remove("waiting")  # not loaded, so it does not wait for the pin
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], UnknownAdapterError)
    assert p.runtime.loaded_ids == ["held"]


def test_rows_of_an_adapter_unloaded_mid_call_get_unknown_adapter(bert, tmp_path):
    """An adapter unloaded between a row's check and its model call fails those rows as
    unknown_adapter; the other rows of the batch still equal the oracle."""
    model = bert[0]
    store = tmp_path / "store"
    _save(model, store, "gone", 1, r=2, lora_alpha=4, target_modules=["query", "value"])
    _save(model, store, "stays", 2, r=4, lora_alpha=4, target_modules=TARGETS)
    p = Predictor(model=model, adapters=str(store), task="classify", canary=False)
    encode = p._encode

    def encode_then_unload(rows, columns):
        encode(rows, columns)
        p.unload_adapter("gone")

    p._encode = encode_then_unload
    texts = [SENTENCES[0], SENTENCES[1], SENTENCES[2]]
    out = p(pa.table({"text": texts, "adapter_id": ["gone", "stays", None]})).to_pylist()
    assert out[0]["error"] == "unknown_adapter: adapter 'gone' is not in the adapter store"
    assert out[0]["scores"] is None
    for row, text in zip(out[1:], texts[1:]):
        assert row["error"] is None
        oracle.assert_close(row["scores"], oracle.scores(model, str(store), row["adapter_id"], "classify", text))
