"""The start-up canary: synthetic rows through one mixed batch and through each adapter
alone must agree, or the Predictor refuses to start. It catches architectures whose
internal reshaping routes rows to the wrong adapter (the single-adapter path cannot be
misrouted: every row uses the same weights)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
ROWS_PER_ADAPTER = 2
ADAPTERS_PER_CHECK = 16


def check_routing(predictor, adapter_ids: list[str] | None = None) -> None:
    """Compare mixed and single-adapter outputs for `adapter_ids` (default: every adapter of
    the store, those already loaded first; the others load through the LRU set).

    Raises:
        RuntimeError: naming the adapter and the largest difference, if they disagree.
    """
    runtime, task = predictor.runtime, predictor.task
    if adapter_ids is None:
        loaded = runtime.loaded_ids
        adapter_ids = loaded + [a for a in runtime.adapter_ids if a not in set(loaded)]
    ids = list(adapter_ids)
    step = max(1, min(ADAPTERS_PER_CHECK, runtime.capacity))
    for start in range(0, max(len(ids), 1), step):
        _check_chunk(runtime, task, ids[start : start + step], seed=start)
    logger.info("canary: mixed batches agree with single-adapter runs for %d adapters", len(ids))


def _check_chunk(runtime, task, ids: list[str], seed: int) -> None:
    """One mixed batch over `ids` plus base rows, then each of them alone."""
    owners = [ids[k % len(ids)] if ids else None for k in range(ROWS_PER_ADAPTER * len(ids))] + [None, None]
    rows = task.synthetic(len(owners), seed)
    with runtime.acquire([a for a in owners if a]) as slots, torch.inference_mode():
        with runtime.route([slots.get(a, 0) for a in owners]):
            mixed = task.forward(rows)
        for adapter in dict.fromkeys(owners):
            picked = [k for k, a in enumerate(owners) if a == adapter]
            with runtime.route([slots.get(adapter, 0)] * len(picked)):
                alone = task.forward([rows[k] for k in picked])
            _compare(mixed[picked], alone, adapter, next(runtime.model.parameters()).dtype)


def _compare(mixed: torch.Tensor, alone: torch.Tensor, adapter: str | None, dtype: torch.dtype) -> None:
    """Raise if mixed and single-adapter outputs differ beyond float noise."""
    diff = (mixed.float() - alone.float()).abs().max().item()
    scale = max(1.0, alone.float().abs().max().item())
    tolerance = (1e-3 if dtype == torch.float32 else 5e-2) * scale
    if not diff <= tolerance:
        name = "the base model" if adapter is None else f"adapter {adapter!r}"
        raise RuntimeError(f"start-up canary: rows of {name} in a mixed batch differ from running it alone by "
                           f"{diff:.3g} (tolerance {tolerance:.3g}); this architecture reshapes its batch in a way "
                           "Switchyard cannot route. Refusing to start")
