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
from collections.abc import Iterator

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


class _LowRankBase(nn.Module):
    """Stacked low-rank weights of every slot for one base module."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, n_slots: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.d_in, self.d_out = d_in, d_out
        ref = next(base.parameters())
        self.register_buffer("A", ref.new_zeros(n_slots, d_in, rank), persistent=False)  # [S, in, r]
        self.register_buffer("B", ref.new_zeros(n_slots, rank, d_out), persistent=False)  # [S, r, out]
        self.register_buffer("bias", ref.new_zeros(n_slots, d_out) if bias else None, persistent=False)
        self.used: set[int] = set()  # slots with a non-zero delta here

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    def resize(self, n_slots: int, rank: int, bias: bool) -> None:
        """Grow to at least `n_slots` slots and `rank`; new entries are zero (exact no-ops)."""
        n_slots, rank = max(n_slots, self.A.shape[0]), max(rank, self.rank)
        if (n_slots, rank) != (self.A.shape[0], self.rank):
            A = self.A.new_zeros(n_slots, self.d_in, rank)
            B = self.B.new_zeros(n_slots, rank, self.d_out)
            A[: self.A.shape[0], :, : self.rank] = self.A
            B[: self.B.shape[0], : self.rank] = self.B
            self.A, self.B = A, B  # swap, not resize in place: running calls keep the old tensors
        if (bias or self.bias is not None) and (self.bias is None or self.bias.shape[0] < n_slots):
            new_bias = self.A.new_zeros(n_slots, self.d_out)
            if self.bias is not None:
                new_bias[: self.bias.shape[0]] = self.bias
            self.bias = new_bias

    def assign(self, slot: int, delta: ModuleDelta | None) -> None:
        """Write one adapter's weights into `slot`, or clear it."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        if self.bias is not None:
            self.bias[slot].zero_()
        self.used.discard(slot)
        if delta is None:
            return
        r = delta.rank
        self.A[slot, :, :r] = delta.A.T.to(self.A)
        self.B[slot, :r] = delta.B.T.to(self.B)
        if delta.bias is not None:
            self.bias[slot] = delta.bias.to(self.bias)
        self.used.add(slot)

    def _active(self, route: Route | None) -> bool:
        """Whether any row of this call uses an adapter with weights here."""
        return route is not None and not self.used.isdisjoint(route.distinct)

    def _add_delta(self, out: torch.Tensor, h: torch.Tensor, route: Route) -> torch.Tensor:
        """out += h @ B[slot] (+ bias[slot]) per row, in place; h [N, T, r] for N leading rows.

        `out` is the base layer's fresh output, so accumulating into it saves a copy."""
        out = out if out.is_contiguous() else out.contiguous()
        n = out.shape[0]
        out3 = out.view(n, -1, self.d_out)  # [N, T, out]
        if route.uniform is not None:
            s = route.uniform
            out3.view(-1, self.d_out).addmm_(h.reshape(-1, self.rank), self.B[s])
            if self.bias is not None:
                out3 += self.bias[s]
        else:
            idx = route.rows(n)
            out3.baddbmm_(h, self.B.index_select(0, idx))
            if self.bias is not None:
                out3 += self.bias.index_select(0, idx)[:, None, :]
        return out


class LowRankLinear(_LowRankBase):
    """A Linear (or GPT-2 Conv1D) with every adapter's low-rank delta, routed per row."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        route = current_route()
        if not self._active(route):
            return out
        if x.dim() < 2:
            raise RuntimeError("a routed module received an input without a batch dimension; Switchyard cannot "
                               "route this model")
        n = x.shape[0]
        x3 = x.reshape(n, -1, self.d_in).to(self.A.dtype)  # [N, T, in]
        if route.uniform is not None:
            h = x3 @ self.A[route.uniform]  # [N, T, r]
        else:
            h = torch.bmm(x3, self.A.index_select(0, route.rows(n)))  # [N, T, r]
        return self._add_delta(out, h, route)


class LowRankEmbedding(_LowRankBase):
    """An Embedding with every adapter's LoRA (A indexed by token, then B), routed per row."""

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        route = current_route()
        if not self._active(route):
            return out
        if ids.dim() < 2:
            raise RuntimeError("a routed module received an input without a batch dimension; Switchyard cannot "
                               "route this model")
        n, vocab = ids.shape[0], self.d_in
        if route.uniform is not None:
            h = F.embedding(ids, self.A[route.uniform])  # [N, T, r]
        else:
            flat = ids + (route.rows(n) * vocab)[:, None]  # row-wise offset into the stacked tables
            h = F.embedding(flat, self.A.view(-1, self.rank))  # [N, T, r]
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
        if scale is not None:
            h = h * scale
        return self._add_delta(out, h.reshape(n, -1, self.rank), route)


class RoutedHead(nn.Module):
    """A module replaced wholesale per adapter (`modules_to_save`), e.g. a classifier.

    Rows whose adapter has no copy of its own use the base module.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.copies: dict[int, nn.Module] = {}  # slot -> that adapter's module

    def assign(self, slot: int, module: nn.Module | None) -> None:
        """Set or clear the copy used by `slot`."""
        if module is None:
            self.copies.pop(slot, None)
        else:
            self.copies[slot] = module

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = current_route()
        used = [] if route is None else sorted(s for s in route.distinct if s in self.copies)
        if not used:
            return self.base_layer(x, *args, **kwargs)
        if route.uniform is not None:
            return self.copies[route.uniform](x, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs).clone()
        idx = route.rows(x.shape[0])
        for slot in used:
            rows = (idx == slot).nonzero().squeeze(1)
            out[rows] = self.copies[slot](x[rows], *args, **kwargs)
        return out
