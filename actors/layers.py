"""Routed layers: one wrapped base module holding every adapter's weights, each row its own.

For a base module W and adapters stacked in slots (slot 0 is all zeros: "no adapter"),
row b with slot s_b computes

    y_b = W(x_b) + (x_b @ A[s_b]) @ B[s_b] + bias[s_b]          (LowRank*, per row)
    y_b = head[s_b](x_b)  if adapter s_b has its own copy, else W(x_b)   (RoutedHead)

where A[s] = A_s.T (in x r), B[s] = B_s.T (r x out) with the adapter's scaling folded in,
ranks zero-padded to the module's largest. Which slot each row uses is carried by a
`Route` in a context variable, so concurrent calls in other threads never see it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from actors.adapters import ModuleDelta

_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("switchyard_route", default=None)


class Route:
    """Which slot each row of one model call uses.

    Args:
        slots: slot per batch row (0 = base), a long tensor on the model's device.
    """

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots  # [B]
        self.batch_size = slots.shape[0]
        distinct = set(slots.tolist())
        self.uniform = next(iter(distinct)) if len(distinct) == 1 else None
        self.distinct = distinct - {0}
        self._expanded: dict[int, torch.Tensor] = {self.batch_size: slots}

    def rows(self, n: int) -> torch.Tensor:
        """Slot per leading row when a module sees `n` rows; models that unfold each batch
        row into several (MobileViT's patches) keep them batch-major: `repeat_interleave`."""
        if n not in self._expanded:
            if n % self.batch_size:
                raise RuntimeError(f"a routed module received {n} rows for a batch of {self.batch_size}; this model "
                                   "reshapes its batch in a way Switchyard cannot route")
            self._expanded[n] = self.slots.repeat_interleave(n // self.batch_size)
        return self._expanded[n]


@contextlib.contextmanager
def routing(route: Route | None) -> Iterator[None]:
    """Make `route` the routing of every routed module called in this context."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


def current_route() -> Route | None:
    """The route of the model call running in this thread, if any."""
    return _ROUTE.get()


@dataclass(frozen=True, eq=False)
class _Stack:
    """Every slot's low-rank weights of one module, replaced whole, never edited in shape.

    A forward reads the layer's stack once, so a resize in another thread (which builds a
    new stack and swaps the reference) can never hand it an A of one size and a B of another.
    """

    A: torch.Tensor  # [S, in, r]
    B: torch.Tensor  # [S, r, out]
    bias: torch.Tensor | None  # [S, out]

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    @property
    def n_slots(self) -> int:
        return self.A.shape[0]

    def grown(self, n_slots: int, rank: int, bias: bool) -> _Stack:
        """A new stack of at least `n_slots` slots and `rank`, this one's weights copied in;
        the new entries are zero (exact no-ops)."""
        n_slots, rank = max(n_slots, self.n_slots), max(rank, self.rank)
        A, B = self.A.new_zeros(n_slots, self.A.shape[1], rank), self.B.new_zeros(n_slots, rank, self.B.shape[2])
        A[: self.n_slots, :, : self.rank] = self.A
        B[: self.n_slots, : self.rank] = self.B
        new_bias = None
        if bias or self.bias is not None:
            new_bias = self.A.new_zeros(n_slots, self.B.shape[2])
            if self.bias is not None:
                new_bias[: self.n_slots] = self.bias
        return _Stack(A, B, new_bias)


class _LowRankBase(nn.Module):
    """Stacked low-rank weights of every slot for one base module.

    Writers (`resize`, `assign`) are serialised by the caller (the runtime's lock); forwards
    run concurrently with them and read `self.stack` once.
    """

    def __init__(self, base: nn.Module, d_in: int, d_out: int, n_slots: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.d_in, self.d_out = d_in, d_out
        ref = next(base.parameters())
        self.stack = _Stack(ref.new_zeros(n_slots, d_in, rank), ref.new_zeros(n_slots, rank, d_out),
                            ref.new_zeros(n_slots, d_out) if bias else None)
        self.used: frozenset[int] = frozenset()  # slots with a non-zero delta here; replaced, never edited

    @property
    def A(self) -> torch.Tensor:
        return self.stack.A

    @property
    def B(self) -> torch.Tensor:
        return self.stack.B

    @property
    def bias(self) -> torch.Tensor | None:
        return self.stack.bias

    @property
    def rank(self) -> int:
        return self.stack.rank

    def resize(self, n_slots: int, rank: int, bias: bool) -> None:
        """Grow to at least `n_slots` slots and `rank` (and a bias stack if `bias`).

        Running calls keep the stack they read; the new one holds the same weights."""
        old = self.stack
        if n_slots > old.n_slots or rank > old.rank or (bias and old.bias is None):
            self.stack = old.grown(n_slots, rank, bias)  # one reference swap

    def assign(self, slot: int, delta: ModuleDelta | None) -> None:
        """Write one adapter's weights into `slot`, or clear it (the slot must not be in use)."""
        stack = self.stack
        self.used = self.used - {slot}
        stack.A[slot].zero_()
        stack.B[slot].zero_()
        if stack.bias is not None:
            stack.bias[slot].zero_()
        if delta is None or delta.rank == 0:  # rank 0: a module pruned away (AdaLoRA) adds nothing
            return
        r = delta.rank
        stack.A[slot, :, :r] = delta.A.T.to(stack.A)
        stack.B[slot, :r] = delta.B.T.to(stack.B)
        if delta.bias is not None:
            stack.bias[slot] = delta.bias.to(stack.bias)
        self.used = self.used | {slot}

    def _active(self, route: Route | None) -> bool:
        """Whether any row of this call uses an adapter with weights here."""
        return route is not None and not self.used.isdisjoint(route.distinct)

    def _add_delta(self, out: torch.Tensor, h: torch.Tensor, route: Route, stack: _Stack) -> torch.Tensor:
        """out += h @ B[slot] (+ bias[slot]) per row, in place; h [N, T, r] for N leading rows.

        `out` is the base layer's fresh output, so accumulating into it saves a copy."""
        out = out if out.is_contiguous() else out.contiguous()
        n = out.shape[0]
        out3 = out.view(n, -1, self.d_out)  # [N, T, out]
        if route.uniform is not None:
            s = route.uniform
            out3.view(-1, self.d_out).addmm_(h.reshape(-1, stack.rank), stack.B[s])
            if stack.bias is not None:
                out3 += stack.bias[s]
        else:
            idx = route.rows(n)
            out3.baddbmm_(h, stack.B.index_select(0, idx))
            if stack.bias is not None:
                out3 += stack.bias.index_select(0, idx)[:, None, :]
        return out


class LowRankLinear(_LowRankBase):
    """A Linear (or GPT-2 Conv1D) with every adapter's low-rank delta, routed per row."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stack = self.stack  # read once: a concurrent resize swaps it whole
        out = self.base_layer(x, *args, **kwargs)
        route = current_route()
        if not self._active(route):
            return out
        if x.dim() < 2:
            raise RuntimeError("a routed module received an input without a batch dimension; Switchyard cannot "
                               "route this model")
        n = x.shape[0]
        x3 = x.reshape(n, -1, self.d_in).to(stack.A.dtype)  # [N, T, in]
        if route.uniform is not None:
            h = x3 @ stack.A[route.uniform]  # [N, T, r]
        else:
            h = torch.bmm(x3, stack.A.index_select(0, route.rows(n)))  # [N, T, r]
        return self._add_delta(out, h, route, stack)


class LowRankEmbedding(_LowRankBase):
    """An Embedding with every adapter's LoRA (A indexed by token, then B), routed per row."""

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stack = self.stack  # read once: a concurrent resize swaps it whole
        out = self.base_layer(ids, *args, **kwargs)
        route = current_route()
        if not self._active(route):
            return out
        if ids.dim() < 2:
            raise RuntimeError("a routed module received an input without a batch dimension; Switchyard cannot "
                               "route this model")
        n, vocab = ids.shape[0], self.d_in
        if route.uniform is not None:
            h = F.embedding(ids, stack.A[route.uniform])  # [N, T, r]
        else:
            flat = ids + (route.rows(n) * vocab)[:, None]  # row-wise offset into the stacked tables
            h = F.embedding(flat, stack.A.view(-1, stack.rank))  # [N, T, r]
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
        if scale is not None:
            h = h * scale
        return self._add_delta(out, h.reshape(n, -1, stack.rank), route, stack)


class RoutedHead(nn.Module):
    """A module replaced wholesale per adapter (`modules_to_save`), e.g. a classifier.

    Rows whose adapter has no copy of its own use the base module, with whatever routed
    layers other adapters installed inside it (LoRA on `classifier.dense`).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.copies: dict[int, nn.Module] = {}  # slot -> that adapter's module; replaced, never edited

    def assign(self, slot: int, module: nn.Module | None) -> None:
        """Set or clear the copy used by `slot` (the slot must not be in use)."""
        copies = {s: m for s, m in self.copies.items() if s != slot}
        if module is not None:
            copies[slot] = module
        self.copies = copies  # one reference swap: running calls keep the mapping they read

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        copies = self.copies
        route = current_route()
        used = [] if route is None else sorted(s for s in route.distinct if s in copies)
        if not used:
            return self.base_layer(x, *args, **kwargs)
        if route.uniform is not None:
            return copies[route.uniform](x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs).clone()
        idx = route.rows(x.shape[0])
        for slot in used:
            rows = (idx == slot).nonzero().squeeze(1)
            out[rows] = copies[slot](x[rows], *args, **kwargs)
        return out


def unrouted_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` as the base model had it: every routed layer inside it (a
    LoRA another adapter put on one of its children) replaced by a copy of what it wraps.

    Args:
        module: a module of the base model, possibly holding routed layers.

    Returns:
        An independent copy without routed layers (and without their stacked weights).
    """
    memo: dict[int, object] = {}
    for inner in reversed(list(module.modules())):  # innermost first: a head may wrap a low-rank layer
        if isinstance(inner, (_LowRankBase, RoutedHead)):
            memo[id(inner)] = copy.deepcopy(inner.base_layer, memo)
    return copy.deepcopy(module, memo)
