"""More adapters than slots: the host-memory tier (parsed weights, least recently used,
sized in bytes), checks that a kept copy still matches its folder, reads ahead, and rows
grouped by adapter so each adapter is loaded at most once per batch. Every output is
checked against PEFT alone."""

from __future__ import annotations

import os
import shutil
import time

import pyarrow as pa
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import oracle
from actors import Predictor
from actors.adapters import AdapterWeights
from actors.kinds.common import ModuleDelta
from actors.runtime import HostTier, folder_signature, nbytes
from testkit.adapters import save_adapter
from testkit.data import SENTENCES

NAMES = ["t0", "t1", "t2", "t3"]


@pytest.fixture(scope="module")
def store4(llama, tmp_path_factory):
    """Four LoRA adapters of different shapes and ranks on the session Llama."""
    model = llama[0]
    store = tmp_path_factory.mktemp("tiers") / "store"
    shapes = [dict(r=4, target_modules=["q_proj", "v_proj"]), dict(r=8, target_modules=["k_proj", "down_proj"]),
              dict(r=2, target_modules=["q_proj", "up_proj"], lora_bias=True), dict(r=6, target_modules=["o_proj"])]
    for seed, (name, shape) in enumerate(zip(NAMES, shapes), start=41):
        save_adapter(model, store, name, LoraConfig(lora_alpha=8, init_lora_weights=False, **shape),
                     model_class=AutoModelForCausalLM, seed=seed)
    return model, str(store)


def _rows(adapters: list) -> pa.Table:
    return pa.table({"prompt": [SENTENCES[i % 7][: 6 + 3 * i] for i in range(len(adapters))], "adapter_id": adapters})


def _assert_oracle(model: str, store: str, out: pa.Table, n: int = 3) -> None:
    for row in out.to_pylist():
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], n)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row


def test_swaps_come_from_host_memory_not_disk(store4):
    """Two slots, four adapters, every batch naming all four: after start-up no adapter is
    read from disk again, yet every row equals PEFT alone."""
    model, store = store4
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=3, max_loaded_adapters=2)
    assert len(p.runtime.host) == 4
    for order in (NAMES * 2, NAMES[::-1] + [None, "t1"]):
        _assert_oracle(model, store, p(_rows(order)))
    assert p.runtime.disk_reads == 0 and p.runtime.slot_loads >= 4  # start-up's canary included


def test_each_adapter_loads_once_per_batch_resident_ones_first(store4):
    """Rows interleaved a, b, c, d, a, b, c, d over two slots: grouped by adapter, a batch
    loads each adapter at most once, and the two already in slots need no load at all."""
    model, store = store4
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=2, max_loaded_adapters=2)
    resident = set(p.runtime.loaded_ids)
    before = p.runtime.slot_loads
    out = p(_rows(NAMES * 2))
    assert p.runtime.slot_loads - before == len(set(NAMES) - resident) == 2
    _assert_oracle(model, store, out, 2)


def test_without_a_host_tier_every_swap_reads_the_disk(store4):
    model, store = store4
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=3, max_loaded_adapters=1,
                  adapter_cache_mb=0)
    assert len(p.runtime.host) == 0
    reads = p.runtime.disk_reads
    _assert_oracle(model, store, p(_rows(NAMES)))
    assert p.runtime.disk_reads - reads == 3  # the one in the slot needs no read


def test_a_folder_changed_on_disk_is_read_again(llama, store4, tmp_path):
    """A kept copy whose folder was re-saved (other rank, other modules) is not used."""
    model = llama[0]
    store = tmp_path / "store"
    shutil.copytree(store4[1], store)
    p = Predictor(model=model, adapters=str(store), task="generate", max_new_tokens=3, max_loaded_adapters=1)
    p(_rows(["t1"]))  # t0 leaves its slot; its parsed copy stays in host memory
    shutil.rmtree(store / "t0")
    save_adapter(model, store, "t0", LoraConfig(r=16, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["v_proj", "gate_proj"]),
                 model_class=AutoModelForCausalLM, seed=99)
    oracle.oracle_model.cache_clear()
    reads = p.runtime.disk_reads
    _assert_oracle(model, str(store), p(_rows(["t0", "t1"])))
    assert p.runtime.disk_reads == reads + 1


def test_reads_ahead_land_in_the_host_tier(store4):
    """Adapters read ahead (as a batch does for its next model call while one runs) land in
    the host tier, and the call that needs them does not read them again."""
    model, store = store4
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=2, max_loaded_adapters=2)
    for name in NAMES:
        p.runtime.host.drop(name)
    a, b = [name for name in NAMES if name not in p.runtime.loaded_ids]
    reads = p.runtime.disk_reads
    p.runtime.prefetch([a, b, "missing"])  # an unknown id is left to the call that names it
    deadline = time.monotonic() + 60
    while (a not in p.runtime.host or b not in p.runtime.host) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a in p.runtime.host and b in p.runtime.host and p.runtime.disk_reads == reads + 2
    _assert_oracle(model, store, p(_rows([a, b, a])), 2)
    assert p.runtime.disk_reads == reads + 2  # what was read ahead is not read again


def _weights(name: str, n: int) -> AdapterWeights:
    """Weights holding one float32 tensor of `n` elements (4n bytes)."""
    return AdapterWeights(name, "LORA", {"m": ModuleDelta(A=torch.zeros(1, n))})


def test_host_tier_keeps_the_most_recent_within_its_bytes():
    tier = HostTier(limit=1000)
    for name in ("a", "b", "c"):
        tier.put(name, _weights(name, 100), ("sig",))  # 400 bytes each
    assert (len(tier), tier.bytes, "a" in tier) == (2, 800, False)  # a, the least recent, went
    assert tier.get("b", ("sig",)) is not None  # b is now the most recent
    tier.put("d", _weights("d", 100), ("sig",))
    assert ("c" in tier, "b" in tier, tier.bytes) == (False, True, 800)
    assert tier.get("b", ("other",)) is None  # its folder changed
    tier.put("huge", _weights("huge", 1000), ("sig",))  # 4000 bytes: over the limit, not kept
    assert "huge" not in tier and tier.bytes == 800


def test_nbytes_counts_each_storage_once():
    base = torch.zeros(10, 10)  # 400 bytes
    delta = ModuleDelta(A=base[:2], B=base.T, bias=torch.zeros(5, dtype=torch.float64))  # views + 40 bytes
    assert nbytes(AdapterWeights("x", "LORA", {"m": delta, "n": delta}, prefix=torch.zeros(3))) == 400 + 40 + 12


def test_folder_signature_changes_when_a_file_is_rewritten(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    before = folder_signature(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    os.utime(tmp_path / "adapter_config.json", ns=(0, 123))
    assert folder_signature(tmp_path) != before and folder_signature(tmp_path / "gone") == ()


def test_adapter_cache_mb_is_checked():
    from actors.config import PredictorConfig

    with pytest.raises(ValueError, match=r"adapter_cache_mb \(-1\) must be an integer >= 0"):
        PredictorConfig(model="m", adapter_cache_mb=-1)


def test_a_slow_disk_read_does_not_stall_other_calls(store4, monkeypatch):
    """While one call waits on the disk for its adapter, a call whose adapter is in a slot
    runs to the end: the read holds no lock."""
    import threading

    import actors.runtime

    model, store = store4
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=2, max_loaded_adapters=2,
                  adapter_cache_mb=0)
    resident = p.runtime.loaded_ids[-1]
    slow = next(name for name in NAMES if name not in p.runtime.loaded_ids)
    entered, release = threading.Event(), threading.Event()
    original = actors.runtime.read_adapter

    def blocking(path, adapter_id, base):
        if adapter_id == slow:
            entered.set()
            assert release.wait(60)
        return original(path, adapter_id, base)

    monkeypatch.setattr(actors.runtime, "read_adapter", blocking)
    result = {}
    waiting = threading.Thread(target=lambda: result.setdefault("slow", p(_rows([slow]))))
    waiting.start()
    assert entered.wait(60)
    _assert_oracle(model, store, p(_rows([resident])), 2)  # finishes while the other read blocks
    assert waiting.is_alive()
    release.set()
    waiting.join(60)
    _assert_oracle(model, store, result["slow"], 2)


def test_a_call_pays_only_for_the_largest_rank_among_its_rows(llama, tmp_path):
    """A store with r=2 and r=48 adapters on the same module: a call whose rows use only the
    r=2 one multiplies by A and B cut to rank 2, and every row still equals PEFT alone,
    alone or beside the r=48 rows."""
    from actors.layers import Route

    model = llama[0]
    store = tmp_path / "store"
    for seed, (name, r) in enumerate([("small", 2), ("big", 48)], start=61):
        save_adapter(model, store, name, LoraConfig(r=r, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj"]),
                     model_class=AutoModelForCausalLM, seed=seed)
    p = Predictor(model=model, adapters=str(store), task="generate", max_new_tokens=3)
    layer = next(iter(p.runtime.lowrank_layers.values()))
    slots = dict(zip(p.runtime.loaded_ids, [p.runtime._loaded[a] for a in p.runtime.loaded_ids]))
    A, B = layer._cut(layer.stack, Route(torch.tensor([slots["small"], 0, slots["small"]])))
    assert (A.shape[2], B.shape[1], layer.stack.rank) == (2, 2, 48)
    A, _ = layer._cut(layer.stack, Route(torch.tensor([slots["small"], slots["big"]])))
    assert A.shape[2] == 48
    _assert_oracle(model, str(store), p(_rows(["small", None, "small"])))
    _assert_oracle(model, str(store), p(_rows(["small", "big", None, "big", "small"])))
