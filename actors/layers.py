"""Routed layers: one wrapped base module holding every adapter's weights, each row its own.

For a base module W (bias b) and adapters in slots (slot 0 is "no adapter": every term the
identity), row x_b with slot s = s_b computes, in one pass over the whole batch:

    x'  = in_scale[s] * in_op[s](x)                 IA3 feed-forward; OFT/BOFT rotations
    y   = out_scale[s] * W(x') + shift[s]           shift = (1 - out_scale) b when the kind
                                                    keeps the bias unscaled (DoRA, BOFT), else 0
    y  += (x @ A[s]) @ B[s] + bias[s]               LoRA, DoRA, AdaLoRA, LoHa, VeRA, tokens
    y  += add_op[s](x)                              LoKr
    y   = head[s](x)  if adapter s has its own copy, else W(x)     (RoutedHead)

W(x') is one shared matmul for all rows. A[s] = A_s.T (in x r), B[s] = B_s.T (r x out) with
the adapter's scaling folded in, ranks zero-padded to the module's largest; the vectors are
stacked per slot; `in_op`/`add_op` (structured ops of different shapes per adapter) run on
the rows of their own adapter only. Which slot each row uses is carried by a `Route` in a
context variable, so concurrent calls in other threads never see it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from actors.adapters import ModuleDelta

_ROUTE: contextvars.ContextVar[Route | None] = contextvars.ContextVar("switchyard_route", default=None)
# Per model call, the per-row gathers of the slot stacks are kept for the next calls under
# the same route (generate's decoding steps) up to this many bytes; beyond it they are
# gathered anew at each step.
GATHER_MEMO_BYTES = 256 * 2**20


class Route:
    """Which slot each row of one model call uses.

    Args:
        slots: slot per batch row (0 = base), a long tensor on the model's device.
        virtual: per row, its adapter's virtual tokens `[n, d]` (prompt learning) or None;
            None when no row has any. The task puts them in front of the row's tokens.
        prefix: per row, its adapter's prefix keys and values `[layers * 2, heads, n, head_dim]`
            (prefix tuning) or None; None when no row has any. The task caches them.
    """

    def __init__(self, slots: torch.Tensor, virtual: list[torch.Tensor | None] | None = None,
                 prefix: list[torch.Tensor | None] | None = None) -> None:
        self.slots = slots  # [B]
        self.virtual = virtual
        self.prefix = prefix
        self.batch_size = slots.shape[0]
        listed = slots.tolist()
        distinct = set(listed)
        self.uniform = next(iter(distinct)) if len(distinct) == 1 else None
        self.distinct = distinct - {0}
        self._expanded: dict[int, torch.Tensor] = {self.batch_size: slots}
        self._members: dict[tuple[int, int], torch.Tensor | slice] = {}
        self.ranks: dict[int, int] = {}  # id(layer) -> the largest rank among this call's slots there
        self._spans = _spans(listed)  # slot -> (start, stop) where its rows are contiguous
        self._gathered: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (id(table), n) -> it, rows
        self._gathered_bytes = 0
        self._groups: dict[int, Groups | None] = {}
        self.plans: dict[tuple[int, int], _Plan] = {}  # (id(layer), n) -> its low-rank plan for this call

    def rows(self, n: int) -> torch.Tensor:
        """Slot per leading row when a module sees `n` rows; models that unfold each batch
        row into several (MobileViT's patches) keep them batch-major: `repeat_interleave`."""
        if n not in self._expanded:
            if n % self.batch_size:
                raise RuntimeError(f"a routed module received {n} rows for a batch of {self.batch_size}; this model "
                                   "reshapes its batch in a way Switchyard cannot route")
            self._expanded[n] = self.slots.repeat_interleave(n // self.batch_size)
        return self._expanded[n]

    def members(self, n: int, slot: int) -> torch.Tensor | slice:
        """The leading rows (of `n`) that use `slot`: a slice when they are contiguous (the
        Predictor orders each call's rows by adapter), else their indices; computed once per
        call, not once per module."""
        key = (n, slot)
        if key not in self._members:
            if slot in self._spans:
                k = n // self.batch_size
                start, stop = self._spans[slot]
                self._members[key] = slice(start * k, stop * k)
            else:
                self._members[key] = (self.rows(n) == slot).nonzero().squeeze(1)
        return self._members[key]

    def gather(self, table: torch.Tensor, n: int) -> torch.Tensor:
        """Each of `n` leading rows' entry of a per-slot stack `table` [S, ...]: [n, ...], kept
        for the route's later calls.

        The first call of a route gathers; later calls (generate's decoding steps run under
        one route) reuse it while the gathered tensors fit GATHER_MEMO_BYTES. The stacks'
        rows of slots in use are never written while a call runs (the runtime pins them), and
        the memo keeps the stack it gathered from alive, so its id cannot be reused."""
        key = (id(table), n)
        hit = self._gathered.get(key)
        if hit is not None:
            return hit[1]
        rows = table.index_select(0, self.rows(n))
        size = rows.numel() * rows.element_size()
        if self._gathered_bytes + size <= GATHER_MEMO_BYTES:
            self._gathered[key] = (table, rows)
            self._gathered_bytes += size
        return rows

    def keep_plan(self, key: tuple[int, int], plan: _Plan) -> None:
        """Keep a module's plan for the route's later calls if its gathers fit the memo."""
        size = plan.nbytes
        if self._gathered_bytes + size <= GATHER_MEMO_BYTES:
            self.plans[key] = plan
            self._gathered_bytes += size

    def groups(self, n: int) -> Groups | None:
        """The `n` leading rows as groups of one slot each (see `Groups`), or None when
        padding the groups to one size would more than double the rows (the per-row form is
        then cheaper); computed once per call."""
        if n not in self._groups:
            self._groups[n] = Groups.of(self.rows(n).tolist(), self.slots.device)
        return self._groups[n]


@dataclass(frozen=True, eq=False)
class Groups:
    """A call's rows laid out as k groups of m rows, each group one slot (SGMV's layout): a
    low-rank term then reads each distinct adapter's A and B once per call, not once per row,
    which is what a decoding step (one token per row) pays for.

    Row `pad[g * m + j]` is the j-th row of group g (groups shorter than m repeat their last
    row; those copies are computed and dropped); row i's result is at `pos[i]` of the grouped
    output. Both are None when the rows already lie in that order (rows sorted by adapter in
    groups of equal size, or every row its own adapter): then the layout is a view.
    """

    slots: torch.Tensor  # [k], each group's slot
    m: int
    rows: int  # n, the rows it lays out
    pad: torch.Tensor | None  # [k * m] row per grouped position
    pos: torch.Tensor | None  # [n] grouped position per row

    @property
    def k(self) -> int:
        return self.slots.shape[0]

    @staticmethod
    def of(slots: list[int], device: torch.device) -> Groups | None:
        members: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            members.setdefault(slot, []).append(i)
        k, m = len(members), max(len(rows) for rows in members.values())
        if k * m > 2 * len(slots):
            return None
        pad = [row for rows in members.values() for row in rows + rows[-1:] * (m - len(rows))]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        if pad == list(range(len(slots))):
            return Groups(as_tensor(list(members)), m, len(slots), None, None)
        pos = [0] * len(slots)
        for g, rows in enumerate(members.values()):
            for j, row in enumerate(rows):
                pos[row] = g * m + j
        return Groups(as_tensor(list(members)), m, len(slots), as_tensor(pad), as_tensor(pos))


@dataclass(frozen=True, eq=False)
class _Plan:
    """How one module adds its low-rank terms to the rows of one call: A and B (cut to the
    call's largest rank) per group (`groups`), per row ([n, in, r]) or, for a call of one
    adapter, that adapter's ([in, r]: views of the stack); the bias per row ([n, 1, out]) or
    the adapter's ([out])."""

    A: torch.Tensor
    B: torch.Tensor
    groups: Groups | None
    bias: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        """Bytes of its own (gathered) tensors; views of the stack count nothing."""
        own = [t for t in (self.A, self.B, self.bias) if t is not None and t._base is None]
        return sum(t.numel() * t.element_size() for t in own)


def _spans(slots: list[int]) -> dict[int, tuple[int, int]]:
    """slot -> (first row, last row + 1) for every slot whose rows form one contiguous run."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, slot in enumerate(slots):
        first.setdefault(slot, i)
        last[slot] = i
    return {slot: (first[slot], last[slot] + 1) for slot in first
            if all(slots[i] == slot for i in range(first[slot], last[slot] + 1))}


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
    """Every slot's weights of one module, replaced whole, never edited in shape.

    A forward reads the layer's stack once, so a resize in another thread (which builds a
    new stack and swaps the reference) can never hand it an A of one size and a B of another.
    """

    A: torch.Tensor  # [S, in, r]
    B: torch.Tensor  # [S, r, out]
    bias: torch.Tensor | None  # [S, out]
    in_scale: torch.Tensor | None = None  # [S, in], ones where unused
    out_scale: torch.Tensor | None = None  # [S, out], ones where unused
    shift: torch.Tensor | None = None  # [S, out], zeros where unused

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    @property
    def n_slots(self) -> int:
        return self.A.shape[0]

    def grown(self, n_slots: int, rank: int, bias: bool, in_scale: bool, out_scale: bool) -> _Stack:
        """A new stack of at least `n_slots` slots and `rank`, with the stacks asked for, this
        one's weights copied in; the new entries are exact no-ops (zeros, or ones for scales)."""
        n_slots, rank = max(n_slots, self.n_slots), max(rank, self.rank)
        A, B = self.A.new_zeros(n_slots, self.A.shape[1], rank), self.B.new_zeros(n_slots, rank, self.B.shape[2])
        A[: self.n_slots, :, : self.rank] = self.A
        B[: self.n_slots, : self.rank] = self.B
        d_in, d_out = self.A.shape[1], self.B.shape[2]
        return _Stack(A, B, self._grow(self.bias, bias, n_slots, d_out, 0.0),
                      self._grow(self.in_scale, in_scale, n_slots, d_in, 1.0),
                      self._grow(self.out_scale, out_scale, n_slots, d_out, 1.0),
                      self._grow(self.shift, out_scale, n_slots, d_out, 0.0))

    def _grow(self, old: torch.Tensor | None, wanted: bool, n_slots: int, width: int, fill: float):
        """`old` grown to `n_slots` rows (new rows `fill`), or a new stack if `wanted`, else None."""
        if old is None and not wanted:
            return None
        new = self.A.new_full((n_slots, width), fill)
        if old is not None:
            new[: old.shape[0]] = old
        return new


@dataclass(frozen=True)
class _Usage:
    """Which slots have which terms in one module; replaced whole, never edited."""

    lowrank: frozenset[int] = frozenset()
    in_scale: frozenset[int] = frozenset()
    out_scale: frozenset[int] = frozenset()
    in_ops: tuple[tuple[int, object], ...] = ()  # (slot, op)
    add_ops: tuple[tuple[int, object], ...] = ()
    shifted: frozenset[int] = frozenset()  # out_scale slots whose shift is not zero (a kept bias)
    any: frozenset[int] = field(init=False)  # every slot with a term here; read by every forward
    plain: bool = field(init=False)  # low-rank terms only: no scales, no ops

    def __post_init__(self) -> None:
        ops = {slot for slot, _ in self.in_ops + self.add_ops}
        object.__setattr__(self, "any", self.lowrank | self.in_scale | self.out_scale | ops)
        object.__setattr__(self, "plain", not (self.in_scale or self.out_scale or ops))

    def without(self, slot: int) -> _Usage:
        return _Usage(self.lowrank - {slot}, self.in_scale - {slot}, self.out_scale - {slot},
                      tuple(p for p in self.in_ops if p[0] != slot), tuple(p for p in self.add_ops if p[0] != slot),
                      self.shifted - {slot})


class _LowRankBase(nn.Module):
    """Every slot's weights for one base module (see the module docstring).

    Writers (`resize`, `assign`) are serialised by the caller (the runtime's lock); forwards
    run concurrently with them and read `self.stack` and `self.usage` once.
    """

    def __init__(self, base: nn.Module, d_in: int, d_out: int, n_slots: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.d_in, self.d_out = d_in, d_out
        ref = next(base.parameters())
        self.stack = _Stack(ref.new_zeros(n_slots, d_in, rank), ref.new_zeros(n_slots, rank, d_out),
                            ref.new_zeros(n_slots, d_out) if bias else None)
        self.usage = _Usage()
        self._ranks: dict[int, int] = {}  # slot -> its adapter's rank here (0 or absent: none)
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (id(A), r) -> A, B cut to r

    @property
    def used(self) -> frozenset[int]:
        """Slots whose adapter changes this module."""
        return self.usage.any

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

    def resize(self, n_slots: int, rank: int, bias: bool, in_scale: bool = False, out_scale: bool = False) -> None:
        """Grow to at least `n_slots` slots and `rank`, adding the stacks asked for.

        Running calls keep the stack they read; the new one holds the same weights."""
        old = self.stack
        if (n_slots > old.n_slots or rank > old.rank or (bias and old.bias is None)
                or (in_scale and old.in_scale is None) or (out_scale and old.out_scale is None)):
            self.stack = old.grown(n_slots, rank, bias, in_scale, out_scale)  # one reference swap

    def assign(self, slot: int, delta: ModuleDelta | None) -> None:
        """Write one adapter's weights into `slot`, or clear it (the slot must not be in use)."""
        stack = self.stack
        self._ranks[slot] = 0 if delta is None else delta.rank  # a call reads only its own (pinned) slots' ranks
        if self._same_terms(slot, delta):  # a LoRA over a LoRA (swapping adapters): the tensors only
            if delta.rank < stack.A.shape[2]:  # the ranks it does not fill must be zero
                stack.A[slot].zero_()
                stack.B[slot].zero_()
            stack.A[slot, :, : delta.rank].copy_(delta.A.T)  # contiguous when the runtime read it
            stack.B[slot, : delta.rank].copy_(delta.B.T)
            if stack.bias is not None:
                stack.bias[slot] = 0 if delta.bias is None else delta.bias
            return
        self.usage = usage = self.usage.without(slot)
        self._clear(stack, slot)
        if delta is None or delta.empty:  # empty: a module pruned away (AdaLoRA) adds nothing
            return
        lowrank, in_scaled, out_scaled = set(usage.lowrank), set(usage.in_scale), set(usage.out_scale)
        shifted = set(usage.shifted)
        if delta.rank:
            stack.A[slot, :, : delta.rank] = delta.A.T.to(stack.A)
            stack.B[slot, : delta.rank] = delta.B.T.to(stack.B)
            if delta.bias is not None:
                stack.bias[slot] = delta.bias.to(stack.bias)
            lowrank.add(slot)
        if delta.in_scale is not None:
            stack.in_scale[slot] = delta.in_scale.to(stack.in_scale)
            in_scaled.add(slot)
        if delta.out_scale is not None:
            stack.out_scale[slot] = delta.out_scale.to(stack.out_scale)
            shift = self._shift(delta)
            stack.shift[slot] = shift.to(stack.shift)
            out_scaled.add(slot)
            if bool(shift.any()):
                shifted.add(slot)
        ref = stack.A
        self.usage = _Usage(frozenset(lowrank), frozenset(in_scaled), frozenset(out_scaled),
                            usage.in_ops + (((slot, delta.in_op.to(ref)),) if delta.in_op else ()),
                            usage.add_ops + (((slot, delta.add_op.to(ref)),) if delta.add_op else ()),
                            frozenset(shifted))

    def _same_terms(self, slot: int, delta: ModuleDelta | None) -> bool:
        """Whether `delta` is a plain low-rank term (no scales, no ops) and `slot` holds one
        now: writing it leaves the module's usage as it is."""
        usage = self.usage
        return (delta is not None and delta.rank > 0 and delta.in_scale is None and delta.out_scale is None
                and delta.in_op is None and delta.add_op is None and slot in usage.lowrank
                and slot not in usage.in_scale and slot not in usage.out_scale
                and all(s != slot for s, _ in usage.in_ops + usage.add_ops)
                and (delta.bias is None or self.stack.bias is not None))

    def _shift(self, delta: ModuleDelta) -> torch.Tensor:
        """(1 - out_scale) * b: what keeps the base bias unscaled (DoRA, BOFT); 0 for IA3."""
        bias = getattr(self.base_layer, "bias", None)
        if bias is None or delta.scale_bias:
            return torch.zeros_like(delta.out_scale)
        return (1 - delta.out_scale) * bias.detach().float().to(delta.out_scale.device)

    @staticmethod
    def _clear(stack: _Stack, slot: int) -> None:
        """Reset every term of `slot` to the identity."""
        for tensor, fill in ((stack.A, 0), (stack.B, 0), (stack.bias, 0), (stack.in_scale, 1), (stack.out_scale, 1),
                             (stack.shift, 0)):
            if tensor is not None:
                tensor[slot].fill_(fill)

    def _active(self, route: Route | None, usage: _Usage) -> bool:
        """Whether any row of this call uses an adapter that changes this module."""
        return route is not None and not usage.any.isdisjoint(route.distinct)

    def _per_row(self, table: torch.Tensor, route: Route, n: int) -> torch.Tensor:
        """Each row's entry of a per-slot stack, broadcastable over `[N, T, width]`."""
        if route.uniform is not None:
            return table[route.uniform]
        return route.gather(table, n)[:, None, :]

    def _scale_output(self, out: torch.Tensor, route: Route, stack: _Stack, usage: _Usage) -> torch.Tensor:
        """out * out_scale[slot] + shift[slot] per row (DoRA, IA3, BOFT rows), as `[N, T, out]`;
        `out` is the base layer's fresh output, scaled in place when no row's shift is needed."""
        n = out.shape[0]
        out3 = out.reshape(n, -1, self.d_out)
        if usage.out_scale.isdisjoint(route.distinct):
            return out3
        scale = self._per_row(stack.out_scale, route, n)
        if usage.shifted.isdisjoint(route.distinct) and out3.dtype == scale.dtype:
            return out3.mul_(scale)
        return torch.addcmul(self._per_row(stack.shift, route, n), out3, scale)

    def _cut(self, stack: _Stack, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B cut to the largest rank among the call's slots: a row of a smaller rank is
        zero past its rank, so the cut changes no output, and one r=256 adapter in the store
        no longer makes every r=8 call pay for rank 256."""
        r = route.ranks.get(id(self))
        if r is None:
            ranks = self._ranks
            r = route.ranks[id(self)] = max((ranks.get(s, 0) for s in route.distinct), default=0)
        if r >= stack.rank or r == 0:
            return stack.A, stack.B
        key = (id(stack.A), r)
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 8:
                self._views = {}
            views = self._views[key] = (stack.A[:, :, :r], stack.B[:, :r])  # kept: gathers memoise by id
        return views

    def _add_delta(self, out3: torch.Tensor, h: torch.Tensor, route: Route, stack: _Stack,
                   B: torch.Tensor | None = None) -> torch.Tensor:
        """out3 += h @ B[slot] (+ bias[slot]) per row, in place; h [N, T, r], out3 [N, T, out]
        (B: the stack's, or cut to h's rank).

        `out3` is a fresh output of this layer, so accumulating into it saves a copy."""
        B = stack.B if B is None else B
        out3 = out3 if out3.is_contiguous() else out3.contiguous()
        if route.uniform is not None:
            s = route.uniform
            out3.view(-1, self.d_out).addmm_(h.reshape(-1, h.shape[-1]), B[s])
        else:
            out3.baddbmm_(h, route.gather(B, out3.shape[0]))
        if stack.bias is not None:
            out3 += self._per_row(stack.bias, route, out3.shape[0])
        return out3


def _grouped(ops: tuple[tuple[int, object], ...], route: Route,
             n: int) -> Iterator[tuple[torch.Tensor | slice | None, object]]:
    """(rows, op) for each op whose slot has rows in this call; rows None when every row has
    it, a slice when they are contiguous, else their indices."""
    for slot, op in ops:
        if slot not in route.distinct:
            continue
        if route.uniform is not None:
            yield None, op
        else:
            yield route.members(n, slot), op


class LowRankLinear(_LowRankBase):
    """A Linear (or GPT-2 Conv1D) with every adapter's terms, routed per row."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stack, usage = self.stack, self.usage  # read once: a concurrent resize swaps them whole
        route = _ROUTE.get()
        if route is None or usage.any.isdisjoint(route.distinct):
            return self.base_layer(x, *args, **kwargs)
        if x.dim() < 2:
            raise RuntimeError("a routed module received an input without a batch dimension; Switchyard cannot "
                               "route this model")
        n = x.shape[0]
        x3 = x.reshape(n, -1, self.d_in)  # [N, T, in]
        if usage.plain and x.dtype == stack.A.dtype:  # low-rank terms only (LoRA, VeRA, ...): every decoding step
            out3 = self.base_layer(x, *args, **kwargs).reshape(n, -1, self.d_out)
            return self._add_lowrank(out3, x3, route, stack).reshape(*x.shape[:-1], self.d_out)
        x_in = self._transform_input(x3, route, stack, usage)
        out3 = self._scale_output(self.base_layer(x_in.reshape(x.shape).to(x.dtype), *args, **kwargs), route,
                                  stack, usage)
        xs = x3.to(stack.A.dtype)
        if not usage.lowrank.isdisjoint(route.distinct):
            out3 = self._add_lowrank(out3, xs, route, stack)
        for rows, op in _grouped(usage.add_ops, route, n):
            if rows is None:
                out3 = out3 + op(xs).to(out3.dtype)
            elif isinstance(rows, slice):  # out3 is this layer's fresh output: add in place
                out3[rows] += op(xs[rows]).to(out3.dtype)
            else:
                out3 = out3.index_add(0, rows, op(xs.index_select(0, rows)).to(out3.dtype))
        return out3.reshape(*x.shape[:-1], self.d_out)

    def _add_lowrank(self, out3: torch.Tensor, xs: torch.Tensor, route: Route, stack: _Stack) -> torch.Tensor:
        """out3 += (x @ A[slot]) @ B[slot] (+ bias[slot]) per row: one matmul pair for a call of
        one adapter, else grouped by adapter (`Groups`), else per row; the call's first step
        works out which (`_Plan`), its later decoding steps reuse it."""
        n = xs.shape[0]
        plan = route.plans.get((id(self), n))
        if plan is None:
            plan = self._plan(route, stack, n)
        out3 = out3 if out3.is_contiguous() else out3.contiguous()
        if plan.groups is not None:
            groups, t = plan.groups, xs.shape[1]
            k, m = groups.k, groups.m
            if groups.pad is None:
                h = torch.bmm(xs.reshape(k, m * t, self.d_in), plan.A)  # [k, m*T, r]
                out3.view(k, m * t, self.d_out).baddbmm_(h, plan.B)
            else:
                h = torch.bmm(xs.index_select(0, groups.pad).view(k, m * t, self.d_in), plan.A)
                out3 += torch.bmm(h, plan.B).view(k * m, t, self.d_out).index_select(0, groups.pos).to(out3.dtype)
        elif plan.A.dim() == 2:  # one adapter for every row
            out3.view(-1, self.d_out).addmm_(xs.reshape(-1, self.d_in) @ plan.A, plan.B)
        else:  # [N, in, r]: each row its own copy
            out3.baddbmm_(torch.bmm(xs, plan.A), plan.B)
        if plan.bias is not None:
            out3 += plan.bias
        return out3

    def _plan(self, route: Route, stack: _Stack, n: int) -> _Plan:
        """This call's A, B and bias for `n` rows, gathered per group or row; kept on the route
        while the gathers fit its memo (GATHER_MEMO_BYTES)."""
        A, B = self._cut(stack, route)
        if route.uniform is not None:
            s = route.uniform
            plan = _Plan(A[s], B[s], None, None if stack.bias is None else stack.bias[s])
        else:
            groups = route.groups(n)
            index = route.rows(n) if groups is None else groups.slots
            plan = _Plan(A.index_select(0, index), B.index_select(0, index), groups,
                         None if stack.bias is None else stack.bias.index_select(0, route.rows(n))[:, None, :])
        route.keep_plan((id(self), n), plan)
        return plan

    def _transform_input(self, x3: torch.Tensor, route: Route, stack: _Stack, usage: _Usage) -> torch.Tensor:
        """x' per row: in_scale[slot] * x (IA3 feed-forward), in_op[slot](x) (OFT, BOFT)."""
        copied = False  # the caller's x is never written: the first grouped op copies it
        if not usage.in_scale.isdisjoint(route.distinct):
            x3 = x3.to(stack.in_scale.dtype) * self._per_row(stack.in_scale, route, x3.shape[0])
            copied = True  # a new tensor already
        for rows, op in _grouped(usage.in_ops, route, x3.shape[0]):
            if rows is None:
                x3 = op(x3.to(stack.A.dtype))
            elif isinstance(rows, slice):
                x3, copied = (x3, True) if copied else (x3.clone(), True)
                x3[rows] = op(x3[rows].to(stack.A.dtype)).to(x3.dtype)
            else:
                x3 = x3.index_copy(0, rows, op(x3.index_select(0, rows).to(stack.A.dtype)).to(x3.dtype))
        return x3


class LowRankEmbedding(_LowRankBase):
    """An Embedding with every adapter's LoRA (A indexed by token, then B) and output scale
    (DoRA), routed per row."""

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stack, usage = self.stack, self.usage  # read once: a concurrent resize swaps them whole
        out = self.base_layer(ids, *args, **kwargs)
        route = current_route()
        if not self._active(route, usage):
            return out
        if ids.dim() < 2:
            raise RuntimeError("a routed module received an input without a batch dimension; Switchyard cannot "
                               "route this model")
        n, vocab = ids.shape[0], self.d_in
        out3 = self._scale_output(out, route, stack, usage)
        if usage.lowrank.isdisjoint(route.distinct):
            return out3.reshape(out.shape)
        if route.uniform is not None:
            h = F.embedding(ids, stack.A[route.uniform])  # [N, T, r]
        else:
            flat = ids + (route.rows(n) * vocab)[:, None]  # row-wise offset into the stacked tables
            h = F.embedding(flat, stack.A.view(-1, stack.rank))  # [N, T, r]
        scale = getattr(self.base_layer, "embed_scale", None)  # Gemma-style scaled embeddings
        if scale is not None:
            h = h * scale
        return self._add_delta(out3, h.reshape(n, -1, stack.rank), route, stack).reshape(out.shape)


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
