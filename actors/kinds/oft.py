"""OFT (PEFT `tuners/oft/`), eval mode: `y = W(x R) + b`, R = blockdiag(R_1..R_k) acting on
the input's blocks of `oft_block_size`, each R_i from its saved upper-triangle parameters by
the Cayley transform (the Cayley-Neumann series of `num_cayley_neumann_terms` terms unless
`use_cayley_neumann=False`); `block_share` uses one block for all; `coft` projects the
parameters first (PEFT re-projects on every forward, so its output drifts by ~1e-7 between
calls: Switchyard projects once).

Saved keys per module: `.oft_R.weight` [k (1 with block_share), bs (bs-1) / 2].
Routed op: `BlockRotation`, each row's input blocks times its adapter's R_i, on the rows of
that adapter only, before the shared base matmul. The blocks are computed at load with
PEFT's own `OFTRotationModule`. PEFT's OFT adapts torch Linear (and Embedding, Conv2d,
which Switchyard does not route for OFT).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from actors.kinds.common import AdapterError, Kind, ModuleDelta, adapted_modules, dims_of, pop_tensor, \
    refuse_leftovers, refuse_nothing


MARKERS = ("oft_R.weight", "oft_embedding_R.weight")


class BlockRotation:
    """`x -> x @ blockdiag(R)` on the last dimension, R `[k, bs, bs]` (PEFT's einsum
    `...rk,rkc->...rc`, as one batched matmul over the blocks: about twice as fast on CPU)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # [k, bs, bs]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, bs, _ = self.blocks.shape
        blocks_first = x.reshape(-1, k, bs).transpose(0, 1)  # [k, N*T, bs]
        return torch.bmm(blocks_first, self.blocks).transpose(0, 1).reshape(x.shape)

    def to(self, ref: torch.Tensor) -> BlockRotation:
        return BlockRotation(self.blocks.to(device=ref.device, dtype=ref.dtype))


def refuse_linear_only(modules: dict[str, nn.Module], name: str, adapter_id: str, title: str) -> None:
    """Refuse a structured kind (OFT, BOFT, LoKr) on anything but a torch Linear."""
    module = modules.get(name)
    if module is not None and not isinstance(module, nn.Linear):
        raise AdapterError(f"adapter {adapter_id!r}: {title} on module {name} of type {type(module).__name__} is not "
                           f"supported: Switchyard routes {title} on torch Linear modules only (PEFT's {title} has no "
                           "layer for GPT-2's Conv1D at all); drop it from target_modules or train LoRA for it")



def oft_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """OFT's rotation per module, as a `BlockRotation` of the input.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its OFTConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    deltas = {}
    for name, _ in adapted_modules(tensors, MARKERS):
        refuse_linear_only(modules, name, adapter_id, "OFT")  # an Embedding's rotation: oft_embedding_R
        d_in, _ = dims_of(modules, name, adapter_id)
        params = pop_tensor(tensors, name, "oft_R.weight", adapter_id)  # [k or 1, bs (bs-1) / 2]
        block = _block_size(params, d_in, config, name, adapter_id)
        deltas[name] = ModuleDelta(in_op=BlockRotation(_rotation_blocks(params, block, d_in, config)))
    refuse_leftovers(tensors, adapter_id)
    return deltas


def _block_size(params: torch.Tensor, d_in: int, config, name: str, adapter_id: str) -> int:
    """The block size whose upper triangle has `params.shape[1]` entries; refuse shapes that
    do not tile the module's input."""
    n = params.shape[1] if params.dim() == 2 else -1
    block = int(round((1 + math.sqrt(1 + 8 * max(n, 0))) / 2))
    blocks = 1 if config.block_share else d_in // max(block, 1)
    if n < 0 or block * (block - 1) // 2 != n or d_in % block or params.shape[0] != blocks:
        raise AdapterError(f"adapter {adapter_id!r}: oft_R of module {name} has shape {tuple(params.shape)}, which "
                           f"does not tile the module's input of {d_in} into OFT blocks")
    return block


def _rotation_blocks(params: torch.Tensor, block: int, d_in: int, config) -> torch.Tensor:
    """Every block's rotation `[d_in / block, block, block]`, by PEFT's own formula."""
    from peft.tuners.oft.layer import OFTRotationModule

    rotation = OFTRotationModule(params.shape[0], params.shape[1], block, d_in, coft=config.coft, eps=config.eps,
                                 block_share=config.block_share, use_cayley_neumann=config.use_cayley_neumann,
                                 num_cayley_neumann_terms=config.num_cayley_neumann_terms)
    with torch.no_grad():
        weight = rotation._project_batch(params, eps=config.eps) if config.coft else params
        blocks = rotation._cayley_batch(weight, block, config.use_cayley_neumann, config.num_cayley_neumann_terms)
    return blocks.repeat(d_in // block, 1, 1) if config.block_share else blocks


KIND = Kind(peft_type="OFT", title="OFT", config_class="OFTConfig", markers=MARKERS,
            tensor_prefix="oft_", refuse=refuse_nothing, deltas=oft_deltas)
