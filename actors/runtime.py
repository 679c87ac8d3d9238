"""The adapter runtime: installs routed layers into a base model and manages adapter slots.

Every adapter of the store is read and validated at start-up. Up to `capacity` of them
live in slots at once (all by default); past that they load on first use into a
least-recently-used set. A batch pins the slots it uses until its model call ends, so
another thread can never evict or overwrite an adapter in use.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from actors.adapters import AdapterWeights, module_dims, read_adapter
from actors.layers import LowRankEmbedding, LowRankLinear, RoutedHead, Route, routing
from actors.store import AdapterStore

logger = logging.getLogger(__name__)


class AdapterRuntime:
    """Holds the routed model and maps adapter ids to slots.

    Args:
        model: the base model (already on its device and dtype, in eval mode).
        store: the adapter store.
        capacity: how many adapters may be loaded at once (None: all of the store).
    """

    def __init__(self, model: nn.Module, store: AdapterStore, capacity: int | None = None) -> None:
        self.model = model
        self.store = store
        self._base_modules = dict(model.named_modules())
        self._lowrank: dict[str, LowRankLinear | LowRankEmbedding] = {}
        self._heads: dict[str, RoutedHead] = {}
        self._lock = threading.Condition()
        self._loaded: OrderedDict[str, int] = OrderedDict()  # adapter id -> slot, coldest first
        self._pins: dict[int, int] = {}
        self.adapter_ids = store.ids()
        self._known = set(self.adapter_ids)
        self._unbounded = capacity is None
        self.capacity = len(self.adapter_ids) if capacity is None else capacity
        self._free = list(range(self.capacity, 0, -1))  # slot 0 is "no adapter"
        self._validate_and_prepare()

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
        """Read one adapter against the unwrapped base modules."""
        return read_adapter(self.store.path(adapter_id), adapter_id, self._base_modules)

    def _install_modules(self, weights: AdapterWeights) -> None:
        """Wrap (once) every module this adapter touches and size its stacks for it."""
        n_slots = self.capacity + 1
        for name, delta in weights.deltas.items():
            layer = self._lowrank.get(name)
            if layer is None:
                base = self._base_modules[name]
                d_in, d_out = module_dims(base)
                kind = LowRankEmbedding if isinstance(base, nn.Embedding) else LowRankLinear
                layer = kind(base, d_in, d_out, n_slots, delta.rank, delta.bias is not None)
                self._lowrank[name] = layer
                if name in self._heads:  # a head installed earlier stays outermost: it wraps the deltas
                    self._heads[name].base_layer = layer
                else:
                    self._replace(name, layer)
            layer.resize(n_slots, delta.rank, delta.bias is not None)
        for name in weights.heads:
            if name not in self._heads:
                self._heads[name] = RoutedHead(self._current(name))
                self._replace(name, self._heads[name])

    def _current(self, name: str) -> nn.Module:
        """The module now installed at `name` (a low-rank wrapper if there is one)."""
        return self._lowrank.get(name) or self._base_modules[name]

    def _replace(self, name: str, module: nn.Module) -> None:
        """Install `module` at dotted path `name` in the model."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, module)

    def _load_into(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter's weights into `slot` of every routed module (all or nothing)."""
        try:
            for name, layer in self._lowrank.items():
                layer.assign(slot, weights.deltas.get(name))
            for name, head in self._heads.items():
                head.assign(slot, self._head_copy(name, weights.heads.get(name)))
        except Exception:
            self._clear(slot)
            self._free.append(slot)
            raise
        self._loaded[weights.adapter_id] = slot

    def _clear(self, slot: int) -> None:
        """Zero `slot` in every routed module and drop its head copies."""
        for layer in self._lowrank.values():
            layer.assign(slot, None)
        for head in self._heads.values():
            head.assign(slot, None)

    def _head_copy(self, name: str, state: dict | None) -> nn.Module | None:
        """A copy of base head `name` carrying the adapter's own weights."""
        if state is None:
            return None
        head = copy.deepcopy(self._base_modules[name])
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
            if adapter_id in self._known or adapter_id in self._loaded:
                if publish:
                    self.publish(adapter_id)
                return
            weights = self._read(adapter_id)
            if self._unbounded and not self._free:
                self.capacity += 1
                self._free.append(self.capacity)
                for layer in self._lowrank.values():
                    layer.resize(self.capacity + 1, 1, False)
            self._install_modules(weights)
            if self._free:
                self._load_into(self._free.pop(), weights)
            if publish:
                self.publish(adapter_id)

    def publish(self, adapter_id: str) -> None:
        """Let rows name `adapter_id` (after `add(adapter_id, publish=False)`)."""
        with self._lock:
            if adapter_id not in self._known:
                self.adapter_ids.append(adapter_id)
                self._known.add(adapter_id)

    def remove(self, adapter_id: str) -> None:
        """Forget an adapter (waiting for running calls that use it).

        Raises:
            KeyError: not a registered adapter.
        """
        with self._lock:
            if adapter_id not in self._known and adapter_id not in self._loaded:
                raise KeyError(adapter_id)
            if adapter_id in self._known:
                self._known.discard(adapter_id)
                self.adapter_ids.remove(adapter_id)
            while adapter_id in self._loaded and self._pins.get(self._loaded[adapter_id]):
                self._lock.wait()
            if adapter_id in self._loaded:
                self._free.append(self._unload(adapter_id))  # the slot stays for the next adapter

    def known(self, adapter_id: str) -> bool:
        """Whether `adapter_id` is an adapter of the store."""
        return adapter_id in self._known

    @contextlib.contextmanager
    def acquire(self, adapter_ids: list[str]) -> Iterator[dict[str, int]]:
        """Load (if needed) and pin `adapter_ids` for one model call; yields id -> slot.

        Raises:
            ValueError: more distinct adapters than `capacity` (callers split batches).
        """
        wanted = list(dict.fromkeys(adapter_ids))
        if len(wanted) > self.capacity:
            raise ValueError(f"a model call needs {len(wanted)} adapters but max_loaded_adapters is {self.capacity}")
        with self._lock:
            while not self._can_hold(wanted):
                self._lock.wait()  # slots are pinned by calls running in other threads
            slots = {a: self._ensure_loaded(a, wanted) for a in wanted}
            for slot in slots.values():
                self._pins[slot] = self._pins.get(slot, 0) + 1
        try:
            yield slots
        finally:
            with self._lock:
                for slot in slots.values():
                    self._pins[slot] -= 1
                self._lock.notify_all()

    def _can_hold(self, wanted: list[str]) -> bool:
        """Whether every adapter of `wanted` can be in a slot at once right now."""
        missing = sum(a not in self._loaded for a in wanted)
        evictable = sum(1 for a, s in self._loaded.items() if not self._pins.get(s) and a not in wanted)
        return missing <= len(self._free) + evictable

    def _ensure_loaded(self, adapter_id: str, keep: list[str]) -> int:
        """Slot of `adapter_id`, loading it (evicting the coldest unpinned adapter) if needed."""
        if adapter_id in self._loaded:
            self._loaded.move_to_end(adapter_id)
            return self._loaded[adapter_id]
        weights = self._read(adapter_id)
        self._install_modules(weights)  # the folder may have changed since start-up
        if not self._free:
            victim = next(a for a, s in self._loaded.items() if not self._pins.get(s) and a not in keep)
            logger.debug("evicting adapter %s", victim)
            self._free.append(self._unload(victim))
        slot = self._free.pop()
        self._load_into(slot, weights)
        return slot

    @contextlib.contextmanager
    def route(self, slots: list[int]) -> Iterator[None]:
        """Route the next model calls in this thread: row i uses `slots[i]` (0 = base)."""
        device = next(self.model.parameters()).device
        with routing(Route(torch.tensor(slots, dtype=torch.long, device=device))):
            yield
