"""What every adapter kind shares: the per-module low-rank form, the `Kind` record the
registry holds, and the helpers kinds use to read safetensors keys against the base model.

Every kind turns an adapter's tensors into one `ModuleDelta` per module, the terms of one
template (the adapter's scaling folded in):

    x'  = in_scale * in_op(x)                        IA3 feed-forward: in_scale; OFT/BOFT: in_op
    y   = out_scale * (W x') + bias_term             DoRA/BOFT: base bias unscaled; IA3: scaled
    y  += B (A x) + bias                             LoRA, DoRA, AdaLoRA, LoHa, VeRA, trainable tokens
    y  += add_op(x)                                  LoKr

Terms a kind does not set are the identity. The routed layers (`actors/layers.py`) stack the
vectors per slot and run the two ops on the rows of their adapter only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be routed correctly; the message names the adapter."""


class RowOp(Protocol):
    """A structured per-adapter op on the rows of one adapter (OFT's rotation, LoKr's
    Kronecker product): `op(x)` maps `[N, T, d_in]` to `[N, T, d]`."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def to(self, ref: torch.Tensor) -> RowOp:
        """A copy on `ref`'s device and dtype."""


@dataclass
class ModuleDelta:
    """One adapter's change to one module, as the terms of the template above."""

    A: torch.Tensor | None = None  # [r, in]  (embedding: [r, num_embeddings])
    B: torch.Tensor | None = None  # [out, r]
    bias: torch.Tensor | None = None  # [out], added with the low-rank term
    in_scale: torch.Tensor | None = None  # [in]
    out_scale: torch.Tensor | None = None  # [out]
    scale_bias: bool = False  # out_scale scales the base bias too (IA3); else the bias stays (DoRA, BOFT)
    in_op: RowOp | None = None  # [N, T, in] -> [N, T, in]
    add_op: RowOp | None = None  # [N, T, in] -> [N, T, out]
    from_tokens: bool = False  # from `trainable_token_indices`, not a target of the config

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    @property
    def empty(self) -> bool:
        """Whether it changes nothing (a module AdaLoRA pruned to rank 0)."""
        return self.rank == 0 and all(t is None for t in (self.in_scale, self.out_scale, self.in_op, self.add_op))


@dataclass(frozen=True)
class Kind:
    """One PEFT adapter type, as Switchyard reads and routes it (PEFT keeps `tuners/<type>/`).

    Attributes:
        peft_type: the `peft_type` of adapter_config.json this kind reads (`"LORA"`).
        title: how messages and docs name it (`"LoRA"`).
        config_class: the name of PEFT's config class that parses adapter_config.json.
        markers: key endings, one per module, that mark a module's weights
            (`"lora_A.weight"`): the module name is what precedes them.
        tensor_prefix: a fragment of every key of this kind's own weights (PEFT's tuner
            `prefix`, e.g. `"lora_"`): what the canary hands PEFT's layers.
        refuse: `refuse(config, adapter_id)` raises AdapterError for options it cannot route.
        deltas: `deltas(tensors, config, modules, adapter_id)` pops the kind's tensors and
            returns a `ModuleDelta` per module.
        virtual: for prompt learning, `virtual(tensors, config, modules, adapter_id)` returns
            the virtual tokens `[n, d]` put in front of the adapter's rows; None for the others.
        prefix: for prefix tuning, `prefix(tensors, config, modules, adapter_id)` returns the
            keys and values `[layers * 2, heads, n, head_dim]` cached in front of the
            adapter's rows; None for the others.
    """

    peft_type: str
    title: str
    config_class: str
    markers: tuple[str, ...]
    tensor_prefix: str
    refuse: Callable[[object, str], None]
    deltas: Callable[[dict, object, dict, str], dict[str, ModuleDelta]]
    virtual: Callable[[dict, object, dict, str], torch.Tensor] | None = None
    prefix: Callable[[dict, object, dict, str], torch.Tensor] | None = None

    @property
    def prompt(self) -> bool:
        """Whether it is prompt learning: tokens or a prefix in front of rows, no module adapted."""
        return self.virtual is not None or self.prefix is not None

    def parse_config(self, path: str):
        """PEFT's config object for the adapter folder `path` (`<ConfigClass>.from_pretrained`).

        Args:
            path: the adapter folder.

        Returns:
            The config, as PEFT itself would read it.
        """
        import peft

        return getattr(peft, self.config_class).from_pretrained(path)


def refuse_nothing(config, adapter_id: str) -> None:
    """`Kind.refuse` of a type with no option Switchyard refuses up front (what it cannot route
    is refused with the module it is on, and dropouts act in training only)."""


def module_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module the routed layers can wrap, or None for any other module."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def adapted_modules(tensors: dict, markers: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module name, marker) for every key `PREFIX + name + '.' + marker`, sorted.

    Args:
        tensors: the adapter's tensors, by safetensors key.
        markers: key endings that each mark one module's weights.

    Returns:
        The modules found, with the marker that found each.
    """
    found = []
    for key in list(tensors):
        for marker in markers:
            if key.startswith(PREFIX) and key.endswith("." + marker):
                found.append((key[len(PREFIX):-len(marker) - 1], marker))
    return sorted(found)


def pop_tensor(tensors: dict, name: str, suffix: str, adapter_id: str) -> torch.Tensor:
    """Pop the tensor `PREFIX + name + '.' + suffix` that the format requires.

    Raises:
        AdapterError: it is missing, naming the module.
    """
    key = f"{PREFIX}{name}.{suffix}"
    if key not in tensors:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} lacks {suffix} for module {name}")
    return tensors.pop(key)


def pattern_value(pattern: dict | None, name: str, default):
    """PEFT's per-module override (`rank_pattern`/`alpha_pattern`) for module `name`, else `default`."""
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    return pattern.get(get_pattern_key(pattern.keys(), name), default)


def dims_of(modules: dict[str, nn.Module], name: str, adapter_id: str) -> tuple[int, int]:
    """(in, out) of base module `name`.

    Raises:
        AdapterError: the base model has no such module, or it is of a kind Switchyard
            does not route.
    """
    if name not in modules:
        raise AdapterError(f"adapter {adapter_id!r} has weights for module {name}, which the base model does not "
                           "have: was it trained on another architecture or task head?")
    dims = module_dims(modules[name])
    if dims is None:
        raise AdapterError(f"adapter {adapter_id!r} targets module {name} of type {type(modules[name]).__name__}; "
                           "Switchyard routes Linear, Conv1D and Embedding modules only")
    return dims


def check_shapes(adapter_id: str, name: str, dims: tuple[int, int], A: torch.Tensor, B: torch.Tensor,
                 bias: torch.Tensor | None, r_config: int) -> None:
    """Refuse low-rank weights whose shapes do not fit the base module or the config's rank."""
    d_in, d_out = dims
    r = A.shape[0]
    ok = A.dim() == 2 and B.dim() == 2 and A.shape[1] == d_in and B.shape == (d_out, r)
    if not ok or (bias is not None and bias.shape != (d_out,)):
        raise AdapterError(f"adapter {adapter_id!r}: weights of module {name} (A {tuple(A.shape)}, B "
                           f"{tuple(B.shape)}) do not fit the base module (in {d_in}, out {d_out})")
    if r != r_config:
        raise AdapterError(f"adapter {adapter_id!r}: module {name} has rank {r} but its config says {r_config}")


def check_base_copy(tensors: dict, name: str, module: nn.Module, adapter_id: str) -> None:
    """PEFT saves a copy of the base weights of targeted embeddings (and a tied lm_head);
    it must equal the shared base."""
    copy = tensors.pop(f"{PREFIX}{name}.base_layer.weight", None)
    weight = module.weight.detach()
    if copy is None or (copy.shape == weight.shape and (copy.is_meta or weight.is_meta)):
        return  # on a meta-device base (driver-side checks) only shapes compare; the actors compare values
    if copy.shape != weight.shape or not torch.equal(copy.to(weight.dtype), weight.cpu()):
        raise AdapterError(f"adapter {adapter_id!r} carries its own base weights for {name} (e.g. a resized "
                           "vocabulary); Switchyard shares one base model between adapters and cannot route it")


def refuse_leftovers(tensors: dict, adapter_id: str) -> None:
    """Any tensor a kind did not consume would change the oracle's output: refuse it."""
    if tensors:
        keys = sorted(tensors)
        raise AdapterError(f"adapter {adapter_id!r}: unexpected tensors in {WEIGHTS_FILE}: {keys[:3]}"
                           f"{' ...' if len(keys) > 3 else ''}")
