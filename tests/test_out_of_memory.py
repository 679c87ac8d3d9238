"""A model call that runs out of memory is split in halves and retried before any row fails."""

from __future__ import annotations

import pytest
import torch

import oracle
from actors.predictor import Predictor
from testkit.data import SENTENCES

ADAPTERS = ["head-a", None, "vera", "no-head", "head-b", "head-a", None, "vera"]
ERRORS = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                                "you tried to allocate 17179869184 bytes"),
}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_a_call_that_runs_out_of_memory_is_split_until_it_fits(bert, kind):
    model, store = bert
    predictor = Predictor(model, store, "classify", max_batch_rows=8)
    sizes = []
    run = predictor.task.run

    def tight(encoded):  # room for two rows per call
        sizes.append(len(encoded))
        if len(encoded) > 2:
            raise ERRORS[kind]()
        return run(encoded)

    predictor.task.run = tight
    out = predictor({"text": SENTENCES[:8], "adapter_id": ADAPTERS})
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    for i, adapter in enumerate(ADAPTERS):
        assert out["error"][i] is None
        oracle.assert_close(out["scores"][i], oracle.scores(model, store, adapter, "classify", SENTENCES[i]))


def test_a_row_that_does_not_fit_alone_fails_by_itself(bert):
    model, store = bert
    predictor = Predictor(model, store, "classify")
    run = predictor.task.run

    def no_room_for_long_rows(encoded):
        if any(len(e.inputs) > 12 for e in encoded):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(encoded)

    predictor.task.run = no_room_for_long_rows
    texts = ["a short one", " ".join(["word"] * 20), "the cat sat"]
    out = predictor({"text": texts, "adapter_id": ["head-a", "head-a", "vera"]})
    assert out["error"][1] == "internal: out of memory on one row alone: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert out["scores"][1] is None and out["error"][0] is None and out["error"][2] is None
    oracle.assert_close(out["scores"][2], oracle.scores(model, store, "vera", "classify", texts[2]))
