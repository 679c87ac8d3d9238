"""Adapter runtime corner cases: heads and deltas on the same module, adapters that change
on disk while evicted, late adapters invisible until their canary passes."""

from __future__ import annotations

import shutil
import threading

import pyarrow as pa
import pytest
from peft import LoraConfig
from transformers import AutoModelForCausalLM

import actors.canary
import oracle
from actors import Predictor
from testkit.adapters import save_adapter

PROMPTS = ["the cat sat", "a long way from home", "hello"]


def _save(model, store, name, seed, **kw):
    save_adapter(model, store, name, LoraConfig(init_lora_weights=False, **kw), model_class=AutoModelForCausalLM,
                 seed=seed, save_embedding_layers="auto")


def _assert_oracle(p, model, store, adapters, n=3):
    """Every row of a mixed batch equals PEFT alone for its adapter."""
    out = p(pa.table({"prompt": PROMPTS[: len(adapters)], "adapter_id": adapters})).to_pylist()
    for row in out:
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], n)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row


def test_head_and_a_later_lora_on_the_same_module(llama, tmp_path):
    model = llama[0]
    store = tmp_path / "store"
    _save(model, store, "a-head", 1, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _save(model, store, "b-lora", 2, r=4, lora_alpha=8, target_modules=["lm_head"])
    p = Predictor(model=model, adapters=str(store), task="generate", max_new_tokens=3)
    _assert_oracle(p, model, str(store), ["a-head", "b-lora", None])


def test_adapter_changed_on_disk_while_evicted(llama, tmp_path):
    model = llama[0]
    store = tmp_path / "store"
    _save(model, store, "x", 1, r=4, lora_alpha=8, target_modules=["q_proj"])
    _save(model, store, "y", 2, r=4, lora_alpha=8, target_modules=["v_proj"])
    p = Predictor(model=model, adapters=str(store), task="generate", max_new_tokens=3, max_loaded_adapters=1)
    p(pa.table({"prompt": ["hi"], "adapter_id": ["y"]}))  # evicts x
    shutil.rmtree(store / "x")
    _save(model, store, "x", 3, r=16, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_bias=True)
    oracle.oracle_model.cache_clear()
    _assert_oracle(p, model, str(store), ["x"])
    _assert_oracle(p, model, str(store), ["y", "x"])
    assert len(p.runtime.loaded_ids) == 1 and len(p.runtime._free) == 0


def test_late_adapter_is_unknown_until_its_canary_passes(llama, tmp_path, monkeypatch):
    model, source = llama
    store = tmp_path / "store"
    shutil.copytree(source, store, ignore=shutil.ignore_patterns("vera"))
    p = Predictor(model=model, adapters=str(store), task="generate", max_new_tokens=2)
    shutil.copytree(f"{source}/vera", store / "vera")
    seen_during_check = []
    original = actors.canary._check_chunk

    def spying(runtime, task, ids, seed):
        out = threading.Thread(target=lambda: seen_during_check.append(
            p(pa.table({"prompt": ["hi"], "adapter_id": ["vera"]})).column("error")[0].as_py()))
        out.start()
        out.join()
        original(runtime, task, ids, seed)

    monkeypatch.setattr(actors.canary, "_check_chunk", spying)
    p.load_adapter("vera")
    assert seen_during_check and seen_during_check[0].startswith("unknown_adapter:")
    assert "vera" in p.adapter_ids


def test_unrouted_input_shape_is_refused_not_skipped(llama):
    import torch

    from actors.layers import LowRankLinear, Route, routing

    p = Predictor(model=llama[0], adapters=llama[1], task="generate", canary=False)
    layer = next(m for m in p.runtime._lowrank.values() if isinstance(m, LowRankLinear))
    slot = next(iter(layer.used))
    with routing(Route(torch.tensor([slot]))), pytest.raises(RuntimeError, match="without a batch dimension"):
        layer(torch.zeros(layer.d_in))
