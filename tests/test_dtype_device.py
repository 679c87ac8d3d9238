"""The GPU path's knobs on a CPU machine: bfloat16 weights agree with the float32 oracle at
a bf16 tolerance, and device selection picks the CPU when no GPU is visible."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

import oracle
from actors import Predictor
from actors.predictor import resolve_device
from testkit.data import SENTENCES

BF16_ATOL = 3e-2  # bf16 keeps ~3 significant digits; softmax scores and embeddings are O(1)


def test_bfloat16_classify_agrees_with_oracle(bert):
    model, store = bert
    p = Predictor(model=model, adapters=store, task="classify", dtype="bfloat16")
    assert next(p.task.model.parameters()).dtype == torch.bfloat16
    adapters = [*p.adapter_ids, None]
    out = p(pa.table({"text": SENTENCES[: len(adapters)], "adapter_id": adapters})).to_pylist()
    for row in out:
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, atol=BF16_ATOL, what=str(row["adapter_id"]))


def test_bfloat16_embed_agrees_with_oracle(bert_embed):
    model, store = bert_embed
    p = Predictor(model=model, adapters=store, task="embed", dtype="bfloat16", normalize=True)
    adapters = [*p.adapter_ids, None]
    out = p(pa.table({"text": SENTENCES[: len(adapters)], "adapter_id": adapters})).to_pylist()
    for row in out:
        expected = oracle.embedding(model, store, row["adapter_id"], row["text"], normalize=True)
        oracle.assert_close(row["embedding"], expected, atol=BF16_ATOL, what=str(row["adapter_id"]))


def test_bfloat16_generate_runs_and_adapter_tensors_follow_the_model(llama):
    model, store = llama
    p = Predictor(model=model, adapters=store, task="generate", dtype="bfloat16", max_new_tokens=3)
    stacks = [b for m in p.runtime._lowrank.values() for b in (m.A, m.B)]
    assert stacks and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in stacks)
    out = p(pa.table({"prompt": ["hello there", "the cat"], "adapter_id": ["vera", "lora-rs"]})).to_pylist()
    assert all(r["error"] is None and r["num_generated_tokens"] == 3 for r in out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_device_selection_without_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_classify_agrees_with_oracle(bert):
    model, store = bert
    p = Predictor(model=model, adapters=store, task="classify", device="cuda", dtype="bfloat16")
    stacks = [b for m in p.runtime._lowrank.values() for b in (m.A, m.B)]
    assert all(t.device.type == "cuda" for t in stacks)
    adapters = [*p.adapter_ids, None]
    for row in p(pa.table({"text": SENTENCES[: len(adapters)], "adapter_id": adapters})).to_pylist():
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, atol=BF16_ATOL, what=str(row["adapter_id"]))
