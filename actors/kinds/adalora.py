"""AdaLoRA (PEFT `tuners/adalora/`), eval mode:
`y = Wx + b + (x (A*E)^T B^T) * scaling / (ranknum + 1e-5)`, scaling = lora_alpha if
lora_alpha > 0 else the module's rank, ranknum = the config's `init_r`.

Saved keys per module: `.lora_A` [r, in], `.lora_B` [out, r], `.lora_E` [r, 1] (no `.weight`).
Fold: A' = A * E, B' = B * scaling / (init_r + 1e-5).

Pruned adapters carry a `rank_pattern` (module's `lora_E` key -> one bool per initial rank);
PEFT's load (`resize_modules_by_rank_pattern`) gives such a module rank sum(mask) but keeps
ranknum = init_r, so the fold above holds; a rank-0 module contributes nothing (PEFT saves
its empty tensors; if they are absent PEFT leaves them empty too). PEFT's AdaLoRA adapts
Linear and GPT-2 Conv1D modules only (`use_rslora`, `alpha_pattern` and LoRA's rank
semantics of `rank_pattern` play no part in it, so here neither).
"""

from __future__ import annotations

import torch
from torch import nn

from actors.kinds.common import (
    AdapterError,
    Kind,
    ModuleDelta,
    adapted_modules,
    check_shapes,
    dims_of,
    pop_tensor,
    refuse_leftovers,
)
from actors.kinds.lora import refuse_variants_and_biases

RANKNUM_EPS = 1e-5  # PEFT's SVDLinear.forward: scaling / (ranknum + 1e-5)


def refuse_adalora_options(config, adapter_id: str) -> None:
    """Refuse AdaLoRA options that cannot be routed (the LoRA ones PEFT still applies).

    Args:
        config: the adapter's AdaLoraConfig.
        adapter_id: its id, for the message.

    Raises:
        AdapterError: naming the option and what to do instead.
    """
    refuse_variants_and_biases(config, adapter_id, "AdaLoRA")


def pruned_ranks(config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, int]:
    """Module name -> rank after pruning, from AdaLoRA's `rank_pattern` (empty if unpruned).

    PEFT names each module by its `lora_E` key minus the last part and keeps the rows whose
    mask entry is True (a list of `init_r` bools).

    Args:
        config: the adapter's AdaLoraConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        The pruned rank of every module the pattern names.

    Raises:
        AdapterError: a mask that is not `init_r` bools, or names a module the base lacks.
    """
    ranks = {}
    for key, mask in (config.rank_pattern or {}).items():
        name = key.rpartition(".")[0]
        if not (isinstance(mask, list) and len(mask) == config.init_r and all(isinstance(m, bool) for m in mask)):
            raise AdapterError(f"adapter {adapter_id!r}: its AdaLoRA rank_pattern entry {key!r} is not a list of "
                               f"init_r={config.init_r} booleans, so PEFT cannot load it; save the adapter again "
                               "with PEFT")
        if name not in modules:
            raise AdapterError(f"adapter {adapter_id!r}: its AdaLoRA rank_pattern names module {name}, which the "
                               "base model does not have: was it trained on another architecture?")
        ranks[name] = sum(mask)
    return ranks


def adalora_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """AdaLoRA weights per module as a low-rank pair: E folded into A, the scaling into B.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its AdaLoraConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module (rank 0 for modules pruned away).
    """
    ranks = pruned_ranks(config, modules, adapter_id)
    deltas = {}
    for name, _ in adapted_modules(tensors, ("lora_A",)):
        _refuse_embedding(modules, name, adapter_id)
        dims = dims_of(modules, name, adapter_id)
        A, B = pop_tensor(tensors, name, "lora_A", adapter_id), pop_tensor(tensors, name, "lora_B", adapter_id)
        E = pop_tensor(tensors, name, "lora_E", adapter_id)  # [r, 1]
        rank = ranks.get(name, config.init_r)
        check_shapes(adapter_id, name, dims, A, B, None, rank)
        if E.shape != (rank, 1):
            raise AdapterError(f"adapter {adapter_id!r}: lora_E of module {name} has shape {tuple(E.shape)}, "
                               f"expected ({rank}, 1)")
        scaling = config.lora_alpha if config.lora_alpha > 0 else rank
        deltas[name] = ModuleDelta(A * E, B * (scaling / (config.init_r + RANKNUM_EPS)))
    for name, rank in ranks.items():
        if rank == 0 and name not in deltas:  # pruned away and not saved: PEFT's layer stays empty
            d_in, d_out = dims_of(modules, name, adapter_id)
            deltas[name] = ModuleDelta(torch.zeros(0, d_in), torch.zeros(d_out, 0))
    refuse_leftovers(tensors, adapter_id)
    return deltas


def _refuse_embedding(modules: dict[str, nn.Module], name: str, adapter_id: str) -> None:
    """PEFT's AdaLoRA has no Embedding layer (it raises when it meets one): no oracle, so refuse."""
    if isinstance(modules.get(name), nn.Embedding):
        raise AdapterError(f"adapter {adapter_id!r}: AdaLoRA on embedding {name} is not supported (PEFT's AdaLoRA "
                           "adapts Linear and Conv1D modules only and cannot load it); drop it from target_modules")


KIND = Kind(peft_type="ADALORA", title="AdaLoRA", config_class="AdaLoraConfig", markers=("lora_A",),
            tensor_prefix="lora_", refuse=refuse_adalora_options, deltas=adalora_deltas)
