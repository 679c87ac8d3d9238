"""Mixed batches against the oracle (PEFT, one adapter at a time, each row alone), per
architecture and adapter feature."""

from __future__ import annotations

import functools

import pyarrow as pa
import pytest

import oracle
from actors import Predictor
from testkit.data import SENTENCES, jpeg_bytes, png_bytes


@functools.lru_cache(maxsize=16)
def predictor(model: str, store: str, task: str, **options) -> Predictor:
    """One Predictor per (model, store, task, options) for the whole session."""
    return Predictor(model=model, adapters=store, task=task, **options)


def _mixed(store_ids: list[str], n: int) -> list[str | None]:
    """Every adapter plus base rows (None and ""), interleaved over n rows."""
    cycle = [*store_ids, None, ""]
    return [cycle[(3 * i) % len(cycle)] for i in range(n)]


def test_llama_greedy_mixed_batch_equals_oracle(llama):
    model, store = llama
    p = predictor(model, store, "generate", max_new_tokens=6)
    adapters = _mixed(p.adapter_ids, 18)
    prompts = [SENTENCES[i % len(SENTENCES)][: 5 + 7 * (i % 5)] for i in range(len(adapters))]  # ragged: left padding
    out = p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist()
    assert {r["adapter_id"] for r in out} == set(adapters)
    for row in out:
        text, n, reason = oracle.generate(model, store, row["adapter_id"], row["prompt"], 6)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == (text, n, reason), row
        assert row["error"] is None


def test_llama_seeded_sampling_equals_oracle(llama):
    model, store = llama
    p = predictor(model, store, "generate", max_new_tokens=5, temperature=0.9, top_p=0.9, seed=7)
    adapters = ["vera", "lora-rs", None, "lora-emb-head", "lora-qv"]
    prompts = ["the cat", "a long way from home", "hello", "we went to", "the cat"]
    out = p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist()
    for row in out:
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], 5, temperature=0.9, top_p=0.9, seed=7)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row


def test_gpt2_conv1d_adapters_equal_oracle(gpt2):
    model, store = gpt2
    p = predictor(model, store, "generate", max_new_tokens=5)
    adapters = _mixed(p.adapter_ids, 8)
    prompts = [SENTENCES[i][: 8 + 5 * i] for i in range(8)]
    for row in p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist():
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], 5)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row


def test_bert_classify_per_adapter_heads(bert):
    model, store = bert
    p = predictor(model, store, "classify")
    adapters = _mixed(p.adapter_ids, 14)
    texts = [SENTENCES[i % len(SENTENCES)][: 10 + 9 * (i % 4)] for i in range(14)]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))
        assert row["label_id"] == max(range(len(expected)), key=expected.__getitem__)
        assert row["label"] == {0: "negative", 1: "neutral", 2: "positive"}[row["label_id"]]


@pytest.mark.parametrize("normalize", [False, True])
def test_bert_embed_equals_oracle(bert_embed, normalize):
    model, store = bert_embed
    p = predictor(model, store, "embed", normalize=normalize)
    adapters = _mixed(p.adapter_ids, 9)
    texts = [SENTENCES[i][: 6 + 11 * (i % 3)] for i in range(9)]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        expected = oracle.embedding(model, store, row["adapter_id"], row["text"], normalize)
        oracle.assert_close(row["embedding"], expected, what=str(row["adapter_id"]))


@pytest.mark.parametrize("arch", ["vit", "mobilevit"])
def test_image_classify_equals_oracle(arch, request):
    model, store = request.getfixturevalue(arch)
    p = predictor(model, store, "classify-image")
    adapters = _mixed(p.adapter_ids, 8)
    images = [(png_bytes if i % 2 else jpeg_bytes)(i, (40, 28)) for i in range(8)]
    out = p(pa.table({"image": images, "adapter_id": adapters, "k": list(range(8))})).to_pylist()
    for row in out:
        expected = oracle.scores(model, store, row["adapter_id"], "classify-image", images[row["k"]])
        oracle.assert_close(row["scores"], expected, what=f"{arch} {row['adapter_id']}")
