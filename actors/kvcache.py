"""A key/value cache that grows in place.

transformers' `DynamicLayer` concatenates each step's keys and values onto the cache
(`torch.cat`), so every decoding step copies the whole cache: over t steps that is O(t^2)
bytes, and on the bench Llama (32 rows of 64 + 64 tokens) it was 10-13% of `generate`'s
time. `GrowingLayer` writes each step into spare room of a buffer and hands the attention a
view of the filled part, so a step writes only its own positions. The values are the same
tensors' values: greedy tokens come out identical (bench/mixed_batch.py checks nothing here;
tests/test_kvcache.py does).
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


UPFRONT_NEW_TOKENS = 256  # new positions a cache allocates at its first update; past them it doubles


def first_capacity(prompt: int, new_tokens: int) -> int:
    """Positions to allocate at a cache's first update: the prompt's (`prompt`, any prefix
    included) and up to UPFRONT_NEW_TOKENS new ones. Rows that stop early (EOS, a stop
    string) then hold no memory for a large max_new_tokens they never reach; longer runs
    double the buffer, holding at most twice what they use, as DynamicCache's concatenation
    holds the old and the new cache for a moment at every step."""
    return prompt + min(new_tokens, UPFRONT_NEW_TOKENS)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a buffer with room to grow.

    Args:
        capacity: positions to allocate at the first update (e.g. prompt + max_new_tokens);
            past it the buffer doubles. 0: exactly the first update's length, then doubling.
    """

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self._room: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # keys, values buffers; view given

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        length = held + key_states.shape[-2]
        room = self._room
        # A method of the base class that replaced self.keys (crop, batch_select_indices,
        # reorder_cache, offloading) leaves the buffer stale: start a new one from self.keys.
        if room is None or room[2] is not self.keys or length > room[0].shape[-2]:
            room = self._grow(held, length, key_states, value_states)
        keys, values, _ = room
        keys[..., held:length, :] = key_states
        values[..., held:length, :] = value_states
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]
        self._room = (keys, values, self.keys)
        return self.keys, self.values

    def _grow(self, held: int, length: int, key_states: torch.Tensor,
              value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        """New buffers of room for at least `length` positions, holding the `held` ones so far."""
        size = max(self.capacity, length) if self._room is None else max(2 * self._room[0].shape[-2], length)
        keys = key_states.new_empty(*key_states.shape[:-2], size, key_states.shape[-1])
        values = value_states.new_empty(*value_states.shape[:-2], size, value_states.shape[-1])
        if held:
            keys[..., :held, :] = self.keys
            values[..., :held, :] = self.values
        return keys, values, None

    def reset(self) -> None:
        self._room = None
        super().reset()

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> GrowingLayer:
        """A layer over buffers [B, H, capacity, D] whose first `length` positions the caller
        has filled: no copy; later steps write into the rest, then it doubles."""
        layer = cls(keys.shape[-2])
        layer.device = keys.device
        layer.is_initialized = True
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        layer._room = (keys, values, layer.keys)
        return layer


def growing_cache(model_config: object | None, capacity: int = 0,
                  data: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """transformers' default cache for `model_config`, with each full-attention layer a
    `GrowingLayer` (sliding-window and other layer kinds are kept as transformers makes them).

    Args:
        model_config: the model's config (its decoder's is used), or None: every layer a
            `GrowingLayer`, as `DynamicCache()` makes every layer a full one.
        capacity: positions each layer allocates at its first update (prompt + new tokens).
        data: per layer, keys and values to start from (a prefix); the capacity counts them.

    Returns:
        A DynamicCache to pass as generate's `cache`.
    """
    cache = DynamicCache() if model_config is None else DynamicCache(config=model_config.get_text_config(decoder=True))
    if cache.layers:
        cache.layers = [GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:  # no layer types known: layers are made as updates reach them
        cache.layer_class_to_replicate = functools.partial(GrowingLayer, capacity)
    for i, (keys, values) in enumerate(data or ()):
        cache.update(keys, values, i)
    return cache


def cache_over(buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> DynamicCache:
    """A cache whose layers are `GrowingLayer.over` the given (keys, values) buffers, each
    [B, H, capacity, D] with its first `length` positions filled by the caller (e.g. the
    continuous batcher's merge of two batches' caches, written straight into the room the
    merged batch grows into instead of copied twice)."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer.over(keys, values, length) for keys, values in buffers]
    cache.layer_class_to_replicate = GrowingLayer
    return cache
