"""The routed Linear's low-rank term in every layout it picks (one adapter, grouped by adapter
with and without padding, per row), against each row computed alone by hand:
W x + b + B_s (A_s x) + bias_s."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actors.adapters import ModuleDelta
from actors.layers import Groups, LowRankLinear, Route, routing

D_IN, D_OUT, SLOTS = 12, 10, 5
RANKS = {1: 4, 2: 2, 3: 4, 4: 3}  # slot -> rank; slot 0 is the base


def _layer(bias: bool) -> tuple[LowRankLinear, dict[int, ModuleDelta]]:
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        base.weight.copy_(torch.randn(D_OUT, D_IN, generator=gen))
        base.bias.copy_(torch.randn(D_OUT, generator=gen))
    layer = LowRankLinear(base, D_IN, D_OUT, SLOTS, max(RANKS.values()), bias)
    deltas = {}
    for slot, r in RANKS.items():
        deltas[slot] = ModuleDelta(torch.randn(r, D_IN, generator=gen), torch.randn(D_OUT, r, generator=gen),
                                   torch.randn(D_OUT, generator=gen) if bias and slot % 2 else None)
        layer.assign(slot, deltas[slot])
    return layer, deltas


def _by_hand(base: nn.Linear, deltas: dict[int, ModuleDelta], x: torch.Tensor, slot: int) -> torch.Tensor:
    """One row [T, in] through its own adapter, alone."""
    out = x @ base.weight.T + base.bias
    delta = deltas.get(slot)
    if delta is not None:
        out = out + (x @ delta.A.T) @ delta.B.T
        if delta.bias is not None:
            out = out + delta.bias
    return out


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(slots=st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=12), tokens=st.integers(1, 3),
       bias=st.booleans(), sort=st.booleans())
def test_every_layout_equals_each_row_alone(slots, tokens, bias, sort):
    layer, deltas = _layer(bias)
    slots = sorted(slots) if sort else slots
    x = torch.randn(len(slots), tokens, D_IN, generator=torch.Generator().manual_seed(len(slots)))
    step = torch.randn(len(slots), 1, D_IN, generator=torch.Generator().manual_seed(99))  # a decoding step's input
    route = Route(torch.tensor(slots))
    with torch.no_grad(), routing(route):
        got = layer(x)
        assert ((id(layer), len(slots)) in route.plans) == any(slots)  # kept for the route's later calls...
        again = layer(x)
        stepped = layer(step)  # ...which read it, whatever their input
    want = torch.stack([_by_hand(layer.base_layer, deltas, x[i], s) for i, s in enumerate(slots)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    want = torch.stack([_by_hand(layer.base_layer, deltas, step[i], s) for i, s in enumerate(slots)])
    torch.testing.assert_close(stepped, want, rtol=1e-5, atol=1e-4)


def test_plans_past_the_memo_budget_are_made_anew_each_call(monkeypatch):
    monkeypatch.setattr("actors.layers.GATHER_MEMO_BYTES", 0)
    layer, deltas = _layer(bias=True)
    slots = [3, 1, 1, 0, 2]
    x = torch.randn(len(slots), 2, D_IN)
    route = Route(torch.tensor(slots))
    with torch.no_grad(), routing(route):
        outs = [layer(x), layer(x)]
    assert not route.plans
    want = torch.stack([_by_hand(layer.base_layer, deltas, x[i], s) for i, s in enumerate(slots)])
    for got in outs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("slots, layout", [
    ([1, 1, 2, 2, 3, 3], "view"),  # sorted in groups of one size: no copy
    ([1, 2, 3, 4], "view"),  # every row its own adapter
    ([1, 2, 1, 2], "padded"),  # two groups of two, interleaved
    ([1, 1, 1, 2], "padded"),  # 2 groups of 3 rows (one padded) for 4 rows
    ([1, 1, 1, 1, 1, 2, 3], None),  # 3 groups of 5 for 7 rows: per row is cheaper
])
def test_groups_layout(slots, layout):
    groups = Groups.of(slots, torch.device("cpu"))
    if layout is None:
        assert groups is None
        return
    assert (groups.pad is None) == (layout == "view")
    if groups.pad is not None:
        pad, pos = groups.pad.tolist(), groups.pos.tolist()
        for g, slot in enumerate(groups.slots.tolist()):  # each group's positions hold rows of its slot only
            assert {slots[row] for row in pad[g * groups.m:(g + 1) * groups.m]} == {slot}
        assert [pad[p] for p in pos] == list(range(len(slots)))  # each row's result is read back from itself


def test_rows_unfolded_by_the_model_are_routed_batch_major():
    """A model that unfolds each batch row into several (MobileViT's patches) keeps them
    batch-major; the grouped layout follows its rows."""
    layer, deltas = _layer(bias=True)
    slots = [2, 1, 1]
    x = torch.randn(6, 2, D_IN)  # each batch row unfolded into 2 leading rows
    with torch.no_grad(), routing(Route(torch.tensor(slots))):
        got = layer(x)
    want = torch.stack([_by_hand(layer.base_layer, deltas, x[i], slots[i // 2]) for i in range(6)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
