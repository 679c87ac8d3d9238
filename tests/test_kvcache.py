"""The growing key/value cache (actors/kvcache.py) against transformers' own DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from actors.kvcache import GrowingLayer, cache_over, growing_cache
from actors.tasks.generate import takes_growing_cache
from testkit.models import build_gpt2, build_llama, llama_tokenizer

PROMPTS = ["the cat sat on the mat and", "a b", "hello there, how are you doing on this fine day"]


def _generate(model, tokenizer, **kwargs) -> torch.Tensor:
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model.generate(**enc, max_new_tokens=9, do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs)


@pytest.mark.parametrize("build", [build_llama, build_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("capacity", [0, 1, 64])  # exact first, doubling from the prompt, room for all
def test_generate_with_a_growing_cache_equals_the_default(tmp_path, build, capacity):
    folder = build(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cache = growing_cache(model.config, capacity)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert torch.equal(_generate(model, tokenizer, cache=cache), _generate(model, tokenizer))
    assert takes_growing_cache(model)


def test_sliding_window_layers_stay_as_transformers_makes_them(tmp_path):
    tokenizer = llama_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    model = MistralForCausalLM(config).eval()
    cache = growing_cache(model.config, 32)
    kinds = {type(layer) for layer in DynamicCache(config=config).layers}
    assert kinds == {DynamicSlidingWindowLayer}  # what transformers makes for this config...
    assert {type(layer) for layer in cache.layers} == kinds  # ...is kept
    assert torch.equal(_generate(model, tokenizer, cache=cache), _generate(model, tokenizer))


def test_a_layer_holds_what_concatenation_holds_through_crops_and_row_selections():
    torch.manual_seed(0)
    ours, theirs = GrowingLayer(capacity=3), DynamicLayer()
    steps = [("update", 2), ("update", 1), ("update", 1), ("crop", -2), ("update", 3), ("select", [2, 0]),
             ("update", 1), ("repeat", 2), ("update", 5)]
    rows = 3
    for op, arg in steps:
        if op == "update":
            k, v = torch.randn(rows, 2, arg, 4), torch.randn(rows, 2, arg, 4)
            got, want = ours.update(k, v), theirs.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        elif op == "crop":
            ours.crop(arg), theirs.crop(arg)
        elif op == "select":
            index = torch.tensor(arg)
            ours.batch_select_indices(index), theirs.batch_select_indices(index)
            rows = len(arg)
        else:
            ours.batch_repeat_interleave(arg), theirs.batch_repeat_interleave(arg)
            rows *= arg
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_a_step_writes_into_room_and_does_not_copy_what_is_held():
    layer = GrowingLayer(capacity=8)
    keys, _ = layer.update(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2))
    more, _ = layer.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    assert more.data_ptr() == keys.data_ptr() and more.shape[2] == 4  # the same buffer, one position longer
    layer.update(torch.randn(1, 1, 5, 2), torch.randn(1, 1, 5, 2))  # past the room: a buffer twice as long
    assert layer.keys.shape[2] == 9 and layer._room[0].shape[2] == 16


def test_a_prefix_cache_starts_from_its_data():
    data = [(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)) for _ in range(2)]
    cache = growing_cache(None, 10, data)
    assert cache.get_seq_length() == 3
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = cache.update(k, v, 1)
    assert torch.equal(keys, torch.cat([data[1][0], k], dim=2)) and torch.equal(values, torch.cat([data[1][1], v], 2))


def test_a_cache_over_filled_buffers_continues_in_them():
    """`cache_over`: the caller's buffers, their first 3 positions filled, are the cache: a
    step writes position 4 into them (no copy), and past their room it doubles."""
    buffers = [(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)) for _ in range(2)]
    filled = [(k[:, :, :3].clone(), v[:, :, :3].clone()) for k, v in buffers]
    cache = cache_over(buffers, 3)
    assert cache.get_seq_length() == 3
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = cache.update(k, v, 1)
    assert keys.data_ptr() == buffers[1][0].data_ptr() and values.data_ptr() == buffers[1][1].data_ptr()
    assert torch.equal(keys, torch.cat([filled[1][0], k], 2)) and torch.equal(values, torch.cat([filled[1][1], v], 2))
    more = torch.randn(2, 2, 3, 4)
    keys, _ = cache.update(more, more, 1)  # 7 positions: past the 5 of room
    assert torch.equal(keys, torch.cat([filled[1][0], k, more], 2)) and cache.layers[1]._room[0].shape[2] == 10


def test_generate_past_the_first_allocation_equals_peft(tmp_path, monkeypatch):
    """Rows whose new tokens run past the cache's first allocation (UPFRONT_NEW_TOKENS, 2
    here) double its buffer and still equal PEFT alone, row for row."""
    import oracle
    import pyarrow as pa
    from peft import LoraConfig

    from actors import Predictor
    from actors import kvcache
    from testkit.adapters import save_adapter

    assert kvcache.first_capacity(10, 1000) == 10 + kvcache.UPFRONT_NEW_TOKENS
    monkeypatch.setattr(kvcache, "UPFRONT_NEW_TOKENS", 2)
    assert kvcache.first_capacity(10, 9) == 12
    model = build_llama(tmp_path / "model")
    store = tmp_path / "store"
    save_adapter(model, store, "a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                 model_class=AutoModelForCausalLM, seed=1)
    grown = []
    real = GrowingLayer._grow
    monkeypatch.setattr(GrowingLayer, "_grow", lambda self, *a: grown.append(self._room is not None) or real(self, *a))
    predictor = Predictor(model=model, adapters=str(store), task="generate", canary=False)
    adapters, limits = ["a", None, "a"], [9, 5, 9]
    out = predictor(pa.table({"prompt": PROMPTS, "adapter_id": adapters, "max_new_tokens": limits})).to_pylist()
    assert any(grown)  # a buffer grew past its first allocation
    for row, prompt, adapter, n in zip(out, PROMPTS, adapters, limits):
        text, count, _ = oracle.generate(model, str(store), adapter, prompt, n)
        assert (row["generated_text"], row["num_generated_tokens"]) == (text, count)
