"""The start-up canary (actors/canary.py): a model whose internal reshaping sends a row's
hidden states through another row's adapter must be refused, not served. We build such
models by wrapping a submodule so the routed layers inside it see the rows in another
order (MobileViT's patches patch-major instead of batch-major; BERT's rows reversed)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from torch import nn

import actors.canary
import oracle
from actors import Predictor
from actors.canary import check_routing
from testkit.data import png_bytes

DIFFERS = r"start-up canary: rows of adapter '{}' in a mixed batch differ from running it alone by [0-9.e+-]+ " \
          r"\(tolerance [0-9.e+-]+\).*Refusing to start"


class _Reordered(nn.Module):
    """Runs `inner` on its input's rows in the order `order(n)` gives, then restores it."""

    def __init__(self, inner: nn.Module, order) -> None:
        super().__init__()
        self.inner, self.order = inner, order

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        index = self.order(x.shape[0]).to(x.device)  # new row j holds old row index[j]
        return self.inner(x[index], *args, **kwargs)[torch.argsort(index)]


def _patch_major(patch_area: int):
    """Batch-major rows (image b, patch p at b*P + p) to patch-major (at p*B + b)."""
    return lambda n: torch.arange(n).view(n // patch_area, patch_area).t().reshape(-1)


def _reversed(n: int) -> torch.Tensor:
    return torch.arange(n).flip(0)


def _wrap_mobilevit(monkeypatch, predictor) -> int:
    """Make every MobileViT transformer (where the adapters live) see its rows patch-major."""
    from transformers.models.mobilevit.modeling_mobilevit import MobileViTTransformer

    model = predictor.task.model
    owners = [m for m in model.modules() if isinstance(getattr(m, "transformer", None), MobileViTTransformer)]
    order = _patch_major(model.config.patch_size ** 2)
    for owner in owners:
        monkeypatch.setattr(owner, "transformer", _Reordered(owner.transformer, order))
    return len(owners)


def _wrap_bert(monkeypatch, predictor) -> int:
    """Make the first layer's routed query projection see the batch in reverse order."""
    attention = predictor.task.model.bert.encoder.layer[0].attention.self
    monkeypatch.setattr(attention, "query", _Reordered(attention.query, _reversed))
    return 1


def test_canary_passes_for_mobilevit_batch_major_unfolding(mobilevit):
    model, store = mobilevit
    predictor = Predictor(model=model, adapters=store, task="classify-image")  # runs the canary
    check_routing(predictor)
    assert predictor.runtime.loaded_ids == ["mv-a", "mv-b"]


@pytest.mark.parametrize(("arch", "task", "wrap", "first"), [
    ("mobilevit", "classify-image", _wrap_mobilevit, "mv-a"),
    ("bert", "classify", _wrap_bert, "head-a"),
])
def test_canary_refuses_a_model_that_routes_rows_wrong(request, monkeypatch, arch, task, wrap, first):
    model, store = request.getfixturevalue(arch)
    predictor = Predictor(model=model, adapters=store, task=task, canary=False)
    assert wrap(monkeypatch, predictor) >= 1
    with pytest.raises(RuntimeError, match=DIFFERS.format(first)):
        check_routing(predictor)


def test_canary_is_what_stands_between_a_misrouting_model_and_wrong_answers(mobilevit, monkeypatch):
    model, store = mobilevit
    predictor = Predictor(model=model, adapters=store, task="classify-image", canary=False)
    _wrap_mobilevit(monkeypatch, predictor)
    images = [png_bytes(i, (40, 40)) for i in range(6)]
    adapters = ["mv-a", "mv-b", None, "mv-a", "mv-b", None]
    out = predictor(pa.table({"image": images, "adapter_id": adapters, "k": range(6)})).to_pylist()
    diffs = [max(abs(a - b) for a, b in zip(row["scores"], oracle.scores(
        model, store, row["adapter_id"], "classify-image", images[row["k"]]))) for row in out]
    assert max(diffs) > 1e-3  # silently wrong without the canary


def test_canary_refuses_a_model_that_reshapes_rows_unevenly(mobilevit, monkeypatch):
    model, store = mobilevit
    predictor = Predictor(model=model, adapters=store, task="classify-image", canary=False)
    owner = next(m for m in predictor.task.model.modules() if hasattr(m, "transformer"))

    class _ExtraRow(nn.Module):  # the routed layers see B*P + 1 rows
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.cat([x, x[:1]]))[:-1]

    monkeypatch.setattr(owner, "transformer", _ExtraRow(owner.transformer))
    with pytest.raises(RuntimeError, match=r"a routed module received \d+ rows for a batch of 6.*cannot route"):
        check_routing(predictor)


def test_canary_runs_at_start_unless_turned_off(bert, monkeypatch):
    model, store = bert
    seen = []
    monkeypatch.setattr(actors.canary, "check_routing", seen.append)
    Predictor(model=model, adapters=store, task="classify", canary=False)
    assert seen == []
    predictor = Predictor(model=model, adapters=store, task="classify")
    assert seen == [predictor]


def test_a_misrouting_model_never_starts_with_the_canary_on(bert, monkeypatch):
    """Every routed linear sees its batch reversed from the moment the runtime installs it."""
    from actors.layers import LowRankLinear

    model, store = bert
    real = LowRankLinear.forward
    monkeypatch.setattr(LowRankLinear, "forward", lambda self, x, *a, **k: real(self, x.flip(0), *a, **k).flip(0))
    with pytest.raises(RuntimeError, match=DIFFERS.format("head-a")):
        Predictor(model=model, adapters=store, task="classify")
    Predictor(model=model, adapters=store, task="classify", canary=False)  # starts, unchecked


def test_start_up_canary_covers_adapters_beyond_capacity(llama, monkeypatch):
    model, store = llama
    seen: list[str] = []
    original = actors.canary._check_chunk
    monkeypatch.setattr(actors.canary, "_check_chunk",
                        lambda runtime, task, ids, seed: (seen.extend(ids), original(runtime, task, ids, seed)))
    p = Predictor(model=model, adapters=store, task="generate", max_loaded_adapters=2, max_new_tokens=2)
    assert sorted(seen) == sorted(p.adapter_ids) and len(p.adapter_ids) > 2
    assert len(p.runtime.loaded_ids) <= 2


def test_load_adapter_runs_the_canary_and_drops_a_failing_adapter(llama, tmp_path, monkeypatch):
    import shutil

    model, store = llama
    shutil.copytree(store, tmp_path / "store", ignore=shutil.ignore_patterns("vera"))
    p = Predictor(model=model, adapters=str(tmp_path / "store"), task="generate", max_new_tokens=2)
    shutil.copytree(f"{store}/vera", tmp_path / "store" / "vera")
    original = actors.canary._compare

    def broken(mixed, alone, base, adapter, dtype):
        original(mixed + (1.0 if adapter == "vera" else 0.0), alone, base, adapter, dtype)

    monkeypatch.setattr(actors.canary, "_compare", broken)
    with pytest.raises(ValueError, match="rows of adapter 'vera' in a mixed batch differ"):
        p.load_adapter("vera")
    assert "vera" not in p.adapter_ids
    monkeypatch.setattr(actors.canary, "_compare", original)
    p.load_adapter("vera")
    out = p(pa.table({"prompt": ["the cat"], "adapter_id": ["vera"]})).to_pylist()[0]
    assert (out["generated_text"], out["num_generated_tokens"], out["finish_reason"]) == \
        oracle.generate(model, store, "vera", "the cat", 2)
