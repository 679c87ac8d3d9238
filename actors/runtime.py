"""The adapter runtime: installs routed layers into a base model and manages adapter slots.

Every adapter of the store is read and validated at start-up. Up to `capacity` of them
live in slots at once (all by default); past that they load on first use into a
least-recently-used set. A batch pins the slots it uses until its model call ends, so
another thread can never evict or overwrite an adapter in use.

Two tiers hold adapters: the slots (the routed layers' stacks, on the model's device) and a
host-memory tier of parsed weights (`HostTier`, least-recently-used, sized in bytes, as
vLLM's CPU LoRA cache). Loading an adapter into a slot copies it from the host tier; only an
adapter in neither tier is read from disk, and that read happens off the runtime's lock, so
other calls go on meanwhile. `prefetch` reads a later call's adapters ahead in a thread of
its own.

Every module is resolved against the base model as it was before anything was wrapped
(`BaseTree`): a LoRA on a child of a head (`classifier.dense`) goes into the base head that
rows without a head copy use, and each head copy is made from the untouched base module, so
the order adapters are read in never matters. Model calls run while adapters are added or
removed: routed layers swap whole immutable references (see `actors/layers.py`), and only
published adapters can be acquired.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
from torch import nn

from actors.adapters import AdapterWeights, BaseTree, module_dims, read_adapter
from actors.layers import LowRankEmbedding, LowRankLinear, RoutedHead, Route, routing, unrouted_copy
from actors.store import AdapterStore

logger = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """A model call named an adapter that is not published (never added, removed, or still
    being checked); it is never loaded for such a call."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError would quote the message


class AdapterRuntime:
    """Holds the routed model and maps adapter ids to slots.

    Args:
        model: the base model (already on its device and dtype, in eval mode).
        store: the adapter store.
        capacity: how many adapters may be loaded at once (None: all of the store).
    """

    def __init__(self, model: nn.Module, store: AdapterStore, capacity: int | None = None,
                 host_bytes: int = 0) -> None:
        self.model = model
        self.store = store
        self.base = BaseTree(model)  # before anything is wrapped
        self._lowrank: dict[str, LowRankLinear | LowRankEmbedding] = {}
        self._heads: dict[str, RoutedHead] = {}
        self._lock = threading.Condition()
        self._loaded: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, coldest first
        self._pins: dict[int, int] = {}
        self.adapter_ids = store.ids()
        self._known = set(self.adapter_ids)  # published: rows may name them
        self._pending: set[str] = set()  # added with publish=False, not yet published
        self._unbounded = capacity is None
        self.capacity = len(self.adapter_ids) if capacity is None else capacity
        self._free = list(range(self.capacity, 0, -1))  # slot 0 is "no adapter"
        self._virtual: dict[int, torch.Tensor] = {}  # slot -> prompt learning's virtual tokens [n, d]
        self._prefix: dict[int, torch.Tensor] = {}  # slot -> prefix tuning's keys and values [2L, H, n, hd]
        self._virtual_lengths: dict[str, int] = {}  # adapter id -> positions its tokens or prefix take
        self._head_names: dict[str, frozenset[str]] = {}  # adapter id -> the modules it saves whole
        self._labels: dict[str, dict[int, str]] = {}  # adapter id -> its own label names, if it has some
        self._versions: dict[int, str | None] = {}  # slot -> content hash of the adapter loaded there
        self.host = HostTier(host_bytes)
        self._generation: dict[str, int] = {}  # adapter id -> bumped by add/remove: older reads are stale
        self._reading: dict[str, Future] = {}  # adapter id -> its read ahead, in flight
        self._reader: ThreadPoolExecutor | None = None
        self.disk_reads = 0  # adapters read from disk after start-up (in neither tier, or changed on disk)
        self.slot_loads = 0  # adapters copied into a slot after start-up
        self._validate_and_prepare()

    @property
    def lowrank_layers(self) -> dict[str, LowRankLinear | LowRankEmbedding]:
        """The routed low-rank layers, by base module name."""
        return dict(self._lowrank)

    @property
    def heads(self) -> dict[str, RoutedHead]:
        """The routed heads (`modules_to_save`), by base module name."""
        return dict(self._heads)

    @property
    def loaded_ids(self) -> list[str]:
        """Adapters currently in slots, coldest first."""
        with self._lock:
            return list(self._loaded)

    def _validate_and_prepare(self) -> None:
        """Read every adapter once (refusing bad ones), wrap the modules they touch, and load
        as many as fit."""
        for adapter_id in self.adapter_ids:
            weights = self._read(adapter_id)
            self._install_modules(weights)
            if len(self._loaded) < self.capacity:
                self._load_into(self._free.pop(), weights)
        logger.info("loaded %d of %d adapters", len(self._loaded), len(self.adapter_ids))

    def _read(self, adapter_id: str) -> AdapterWeights:
        """Read one adapter against the untouched base model, and keep it in the host tier
        when slots will be swapped."""
        signature = folder_signature(self.store.path(adapter_id))  # before the read: a later change misses
        weights = self._parse(adapter_id)
        self._note(weights)
        if not self._unbounded:
            self.host.put(adapter_id, weights, signature)
        return weights

    def _note(self, weights: AdapterWeights) -> None:
        """Record what callers ask of an adapter before they run it (positions, heads, labels)."""
        adapter_id = weights.adapter_id
        self._virtual_lengths[adapter_id] = weights.n_virtual
        self._head_names[adapter_id] = frozenset(weights.heads)
        if weights.id2label:
            self._labels[adapter_id] = weights.id2label
        else:
            self._labels.pop(adapter_id, None)

    def labels_of(self, adapter_id: str) -> dict[int, str] | None:
        """Adapter `adapter_id`'s own label names (a config.json beside it), or None."""
        return self._labels.get(adapter_id)

    def heads_of(self, adapter_id: str) -> frozenset[str]:
        """The base modules adapter `adapter_id` replaces whole with its own copy
        (`modules_to_save`), as of its last read."""
        return self._head_names.get(adapter_id, frozenset())

    def virtual_length(self, adapter_id: str) -> int:
        """How many positions adapter `adapter_id` puts in front of a row (the virtual tokens
        of prompt tuning and P-tuning, the prefix of prefix tuning)."""
        return self._virtual_lengths.get(adapter_id, 0)

    def _install_modules(self, weights: AdapterWeights) -> None:
        """Wrap (once) every module this adapter touches and size its stacks for it."""
        n_slots = self.capacity + 1
        for name, delta in weights.deltas.items():
            if delta.empty:  # a module pruned away (AdaLoRA): nothing to route
                continue
            layer = self._lowrank.get(name) or self._wrap_lowrank(name, n_slots, delta.rank, delta.bias is not None)
            layer.resize(n_slots, delta.rank, delta.bias is not None, delta.in_scale is not None,
                         delta.out_scale is not None)
        for name in weights.heads:
            if name not in self._heads:
                self._heads[name] = RoutedHead(self._lowrank.get(name) or self.base.modules[name])
                self._install(name, self._heads[name])

    def _wrap_lowrank(self, name: str, n_slots: int, rank: int, bias: bool) -> LowRankLinear | LowRankEmbedding:
        """Wrap base module `name` in a low-rank layer and install it."""
        base = self.base.modules[name]
        d_in, d_out = module_dims(base)
        kind = LowRankEmbedding if isinstance(base, nn.Embedding) else LowRankLinear
        layer = kind(base, d_in, d_out, n_slots, rank, bias)
        self._lowrank[name] = layer
        if name in self._heads:  # a head of this very module stays outermost: rows without a copy get the delta
            self._heads[name].base_layer = layer
        else:
            self._install(name, layer)
        return layer

    def _install(self, name: str, module: nn.Module) -> None:
        """Install `module` at `name` inside its parent as the untouched base tree has it.

        Resolving the parent there, not in the live model, puts a layer inside a head
        (`classifier.dense`) into the base head that a `RoutedHead` runs for rows without a
        copy of their own, never onto the `RoutedHead` itself where nothing would call it."""
        parent_name, _, child = name.rpartition(".")
        setattr(self.base.modules[parent_name], child, module)

    def _load_into(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter's weights into `slot` of every routed module (all or nothing)."""
        try:
            for name, layer in self._lowrank.items():
                layer.assign(slot, weights.deltas.get(name))
            for name, head in self._heads.items():
                head.assign(slot, self._head_copy(name, weights.heads.get(name)))
            ref = next(self.model.parameters())
            for kept, tensor in ((self._virtual, weights.virtual), (self._prefix, weights.prefix)):
                if tensor is not None:
                    kept[slot] = tensor.to(device=ref.device, dtype=ref.dtype)
        except Exception:
            self._clear(slot)
            self._free.append(slot)
            raise
        self._loaded[weights.adapter_id] = slot
        self._versions[slot] = weights.version

    def _clear(self, slot: int) -> None:
        """Zero `slot` in every routed module and drop its head copies."""
        for layer in self._lowrank.values():
            layer.assign(slot, None)
        for head in self._heads.values():
            head.assign(slot, None)
        self._virtual.pop(slot, None)
        self._prefix.pop(slot, None)
        self._versions.pop(slot, None)

    def version_of(self, slot: int) -> str | None:
        """The content hash of the adapter in `slot` (None for slot 0, the base model): read
        while the slot is pinned, it names the files the call's rows ran through."""
        return self._versions.get(slot)

    def _head_copy(self, name: str, state: dict | None) -> nn.Module | None:
        """A copy of base head `name` as the base model had it (no other adapter's routed
        layers inside), carrying the adapter's own weights."""
        if state is None:
            return None
        head = unrouted_copy(self.base.modules[name])
        ref = next(head.parameters())
        head.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()})
        return head

    def _unload(self, adapter_id: str) -> int:
        """Clear an adapter's slot everywhere and return the slot."""
        slot = self._loaded.pop(adapter_id)
        self._clear(slot)
        return slot

    def add(self, adapter_id: str, publish: bool = True) -> None:
        """Validate and load an adapter that appeared in the store after start-up.

        Args:
            adapter_id: the folder name inside the store.
            publish: make it known to callers now; else `publish(adapter_id)` does it later
                (after a check), and until then no row can name it.

        Raises:
            KeyError: no such adapter folder in the store.
            AdapterError: the adapter cannot be routed (the message names it).
        """
        with self._lock:
            if adapter_id in self._known or adapter_id in self._pending:
                if publish:
                    self.publish(adapter_id)
                return
            while adapter_id in self._loaded:  # a removal of this id waits for running calls: let it finish
                self._lock.wait()
            weights = self._read(adapter_id)  # always the folder as it is now
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            if self._unbounded and not self._free:
                self.capacity += 1
                self._free.append(self.capacity)
                for layer in self._lowrank.values():
                    layer.resize(self.capacity + 1, 1, False)
            self._install_modules(weights)
            if self._free:
                self._load_into(self._free.pop(), weights)
            self._pending.add(adapter_id)
            if publish:
                self.publish(adapter_id)

    def publish(self, adapter_id: str) -> None:
        """Let rows name `adapter_id` (after `add(adapter_id, publish=False)`).

        Raises:
            KeyError: it was removed (or never added) meanwhile; add it again.
        """
        with self._lock:
            if adapter_id in self._known:
                return
            if adapter_id not in self._pending:
                raise KeyError(f"adapter {adapter_id!r} was removed before it was published; load it again")
            self._pending.discard(adapter_id)
            self.adapter_ids.append(adapter_id)
            self._known.add(adapter_id)

    def remove(self, adapter_id: str) -> None:
        """Forget an adapter (waiting for running calls that use it).

        Raises:
            KeyError: not a registered adapter.
        """
        with self._lock:
            if adapter_id not in self._known and adapter_id not in self._pending:
                raise KeyError(adapter_id)
            if adapter_id in self._known:
                self._known.discard(adapter_id)
                self.adapter_ids.remove(adapter_id)
            self._pending.discard(adapter_id)  # from now on no call can acquire it
            self._generation[adapter_id] = self._generation.get(adapter_id, 0) + 1
            self.host.drop(adapter_id)
            while adapter_id in self._loaded and self._pins.get(self._loaded[adapter_id]):
                self._lock.wait()
            if adapter_id in self._loaded:
                self._free.append(self._unload(adapter_id))  # the slot stays for the next adapter
            self._lock.notify_all()  # an add() of the same id may wait for this

    def known(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is an adapter of the store."""
        return adapter_id in self._known

    @contextlib.contextmanager
    def acquire(self, adapter_ids: list[str], include_pending: bool = False) -> Iterator[dict[str, int]]:
        """Load (if needed) and pin `adapter_ids` for one model call; yields id -> slot.

        Args:
            adapter_ids: the adapters of the call's rows (repeats allowed).
            include_pending: also allow adapters added with `publish=False` and not yet
                published (the load-time check of those very adapters).

        Raises:
            ValueError: more distinct adapters than `capacity` (callers split batches).
            UnknownAdapterError: an adapter that is not published (e.g. removed after the
                caller checked it): nothing is loaded for it.
        """
        wanted = list(dict.fromkeys(adapter_ids))
        if len(wanted) > self.capacity:
            raise ValueError(f"a model call needs {len(wanted)} adapters but max_loaded_adapters is {self.capacity}")
        slots = self._pin(wanted, include_pending, wait=True)
        try:
            yield slots
        finally:
            self.release(slots)

    def try_acquire(self, adapter_ids: list[str]) -> dict[str, int] | None:
        """Like `acquire`, without waiting for slots: the pinned id -> slot, or None when the
        slots are pinned by other rows right now. The caller unpins with `release` (the
        continuous batcher pins one row's adapter for as long as the row decodes).

        Raises:
            UnknownAdapterError: an adapter that is not published.
        """
        wanted = list(dict.fromkeys(adapter_ids))
        if len(wanted) > self.capacity:
            return None
        return self._pin(wanted, False, wait=False)

    def _pin(self, wanted: list[str], include_pending: bool, wait: bool) -> dict[str, int] | None:
        """Pin the slots of the distinct adapters `wanted`, loading the ones not in a slot from
        the host tier. Whatever touches the disk runs with the lock released: the check that
        a host-tier copy still matches its folder (file sizes and times), and the read of an
        adapter in neither tier (or changed on disk)."""
        weights: dict[str, AdapterWeights] = {}  # checked against the disk; held here while we load
        while True:
            with self._lock:
                self._check_published(wanted, include_pending)
                while not self._can_hold(wanted):
                    if not wait:
                        return None
                    self._lock.wait()  # slots are pinned by calls running in other threads
                    self._check_published(wanted, include_pending)  # it may have been removed meanwhile
                need = [a for a in wanted if a not in self._loaded and a not in weights]
                if not need:
                    slots = {a: self._ensure_loaded(a, wanted, weights.get(a)) for a in wanted}
                    for slot in slots.values():
                        self._pins[slot] = self._pins.get(slot, 0) + 1
                    return slots
                generations = {a: self._generation.get(a, 0) for a in need}
                reading = [f for f in (self._reading.get(a) for a in need) if f is not None]
            for future in reading:  # a read ahead of one of them: let it land in the host tier
                future.result()
            signatures = {a: folder_signature(self.store.path(a)) for a in need}
            with self._lock:
                stale = []
                for adapter_id in need:
                    cached = self.host.get(adapter_id, signatures[adapter_id])
                    if cached is not None:
                        weights[adapter_id] = cached
                    else:
                        stale.append(adapter_id)
            read = {a: self._read_file(a) for a in stale}  # off the lock: other calls go on
            with self._lock:
                for adapter_id, fresh in read.items():
                    if self._generation.get(adapter_id, 0) != generations[adapter_id]:
                        continue  # added again or removed meanwhile: look again
                    self._note(fresh)
                    self.host.put(adapter_id, fresh, signatures[adapter_id])
                    weights[adapter_id] = fresh

    def _read_file(self, adapter_id: str) -> AdapterWeights:
        """Read an adapter from disk (no lock held; nothing recorded)."""
        self.disk_reads += 1
        return self._parse(adapter_id)

    def _parse(self, adapter_id: str) -> AdapterWeights:
        """An adapter's folder read against the untouched base model, in the slots' layout."""
        return _slot_layout(read_adapter(self.store.path(adapter_id), adapter_id, self.base))

    def prefetch(self, adapter_ids: list[str]) -> None:
        """Read ahead, in a background thread, the adapters of `adapter_ids` that are in
        neither tier (a later call's), so that call finds them in the host tier. A failed
        read is left to that call, which reads again and reports it."""
        if not self.host.limit:
            return  # nowhere to put what is read ahead
        with self._lock:
            todo = [a for a in dict.fromkeys(adapter_ids) if a in self._known and a not in self._loaded
                    and a not in self.host and a not in self._reading]
            if not todo:
                return
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="switchyard-adapter-read")
            for adapter_id in todo:
                self._reading[adapter_id] = self._reader.submit(self._read_ahead, adapter_id,
                                                                self._generation.get(adapter_id, 0))

    def _read_ahead(self, adapter_id: str, generation: int) -> None:
        """One read ahead into the host tier (a failure is left to the call that needs it)."""
        try:
            signature = folder_signature(self.store.path(adapter_id))
            weights = self._read_file(adapter_id)
        except Exception:  # noqa: BLE001 - the call that needs it reads again and reports the error
            weights = None
        with self._lock:
            self._reading.pop(adapter_id, None)
            if weights is not None and self._generation.get(adapter_id, 0) == generation:
                self._note(weights)
                self.host.put(adapter_id, weights, signature)

    def release(self, slots: dict[str, int]) -> None:
        """Unpin what `acquire` or `try_acquire` pinned."""
        with self._lock:
            for slot in slots.values():
                self._pins[slot] -= 1
            self._lock.notify_all()

    def _check_published(self, wanted: list[str], include_pending: bool) -> None:
        """Raise UnknownAdapterError for the first adapter of `wanted` no call may use now."""
        for adapter_id in wanted:
            if adapter_id not in self._known and not (include_pending and adapter_id in self._pending):
                raise UnknownAdapterError(f"adapter {adapter_id!r} is not in the adapter store (it was removed, or "
                                          "its load-time check has not passed yet)")

    def _can_hold(self, wanted: list[str]) -> bool:
        """Whether every adapter of `wanted` can be in a slot at once right now."""
        missing = sum(a not in self._loaded for a in wanted)
        evictable = sum(1 for a, s in self._loaded.items() if not self._pins.get(s) and a not in wanted)
        return missing <= len(self._free) + evictable

    def _ensure_loaded(self, adapter_id: str, keep: list[str], weights: AdapterWeights | None) -> int:
        """Slot of `adapter_id`, loading `weights` (evicting the coldest unpinned adapter) if
        it is not in one."""
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return self._loaded[adapter_id]
        self._install_modules(weights)  # the folder may have changed since start-up
        if self._free:
            slot = self._free.pop()
        else:  # the coldest unpinned adapter's slot; `_load_into` overwrites every routed module of it
            victim = next(a for a, s in self._loaded.items() if not self._pins.get(s) and a not in keep)
            logger.debug("evicting adapter %s", victim)
            slot = self._loaded.pop(victim)
            for kept in (self._virtual, self._prefix, self._versions):
                kept.pop(slot, None)
        self._load_into(slot, weights)
        self.slot_loads += 1
        return slot

    @contextlib.contextmanager
    def route(self, slots: list[int]) -> Iterator[None]:
        """Route the next model calls in this thread: row i uses `slots[i]` (0 = base)."""
        with routing(self.make_route(slots)):
            yield

    def make_route(self, slots: list[int]) -> Route:
        """The Route of a call whose row i uses `slots[i]`, with the rows' virtual tokens and
        prefixes; one Route can serve many calls (its per-row gathers are kept)."""
        device = next(self.model.parameters()).device
        virtual = [self._virtual.get(s) for s in slots]
        prefix = [self._prefix.get(s) for s in slots]
        return Route(torch.tensor(slots, dtype=torch.long, device=device),
                     virtual if any(v is not None for v in virtual) else None,
                     prefix if any(p is not None for p in prefix) else None)


def _slot_layout(weights: AdapterWeights) -> AdapterWeights:
    """`weights` with each low-rank A and B stored transposed in memory (same values and
    shapes): the slots hold A.T and B.T, so a swap into a slot is a contiguous copy."""
    for delta in weights.deltas.values():
        if delta.A is not None:
            delta.A = delta.A.T.contiguous().T
            delta.B = delta.B.T.contiguous().T
    return weights


class HostTier:
    """Parsed adapter weights kept in host memory, least recently used dropped first, at most
    `limit` bytes (0: none kept). An adapter larger than the limit is not kept. Each entry
    keeps the signature of the folder it was read from (`folder_signature`): a lookup with
    another signature (the folder changed since) misses."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[AdapterWeights, int, tuple]] = OrderedDict()

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, adapter_id: str, signature: tuple) -> AdapterWeights | None:
        """The adapter's weights if kept and read from the folder as it is now, else None."""
        entry = self._entries.get(adapter_id)
        if entry is None or entry[2] != signature:
            return None
        self._entries.move_to_end(adapter_id)
        return entry[0]

    def put(self, adapter_id: str, weights: AdapterWeights, signature: tuple) -> None:
        self.drop(adapter_id)
        size = nbytes(weights)
        if size > self.limit:
            return
        while self.bytes + size > self.limit:
            _, (_, dropped, _) = self._entries.popitem(last=False)
            self.bytes -= dropped
        self._entries[adapter_id] = (weights, size, signature)
        self.bytes += size

    def drop(self, adapter_id: str) -> None:
        entry = self._entries.pop(adapter_id, None)
        if entry is not None:
            self.bytes -= entry[1]


def folder_signature(path: str | Path) -> tuple:
    """(name, size, modification time) of each file of an adapter folder: what changes when
    the adapter is re-saved, read without opening a file."""
    try:
        stats = ((e.name, e.stat()) for e in os.scandir(path) if e.is_file())
        return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))
    except OSError:
        return ()  # gone: the read that follows reports it


def nbytes(value: object, seen: set | None = None) -> int:
    """Bytes of the tensors reachable from `value` (dataclasses, containers, objects' fields),
    each tensor's storage counted once."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        key = ("storage", value.untyped_storage().data_ptr())  # views of one tensor count once
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(nbytes(v, seen) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), seen) for f in fields(value))
    if hasattr(value, "__dict__") and not isinstance(value, (type, nn.Module)):
        return sum(nbytes(v, seen) for v in vars(value).values())
    if isinstance(value, nn.Module):
        return sum(nbytes(t, seen) for t in value.state_dict().values())
    return 0
