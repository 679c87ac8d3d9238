"""BOFT (PEFT `tuners/boft/`), eval mode, butterfly factor 1:
`y = s * (W (x M)) + b`, the base bias unscaled, M = P blockdiag(R_1..R_k) P^T with
R_i = Cayley(skew(boft_R_i)) (`torch.linalg.solve`) and P the identity at factor 1.

Saved keys per module: `.boft_R` [1, k, bs, bs], `.boft_s` [out, 1].
Routed ops: OFT's `BlockRotation` of the input on the adapter's rows, then a per-slot output
scale with the bias kept. Without its CUDA extension PEFT forces butterfly factor 1 (it warns
and builds factor-1 layers), so a BOFT adapter of a larger factor has no CPU oracle (PEFT
cannot even load its weights there): refused.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.kinds.common import AdapterError, Kind, ModuleDelta, adapted_modules, dims_of, pop_tensor, \
    refuse_leftovers
from actors.kinds.oft import BlockRotation, refuse_linear_only


def refuse_boft_options(config, adapter_id: str) -> None:
    """Refuse a butterfly factor other than 1 (see the module docstring).

    Args:
        config: the adapter's BOFTConfig.
        adapter_id: its id, for messages.

    Raises:
        AdapterError: naming the factor.
    """
    if config.boft_n_butterfly_factor != 1:
        raise AdapterError(f"adapter {adapter_id!r} uses boft_n_butterfly_factor={config.boft_n_butterfly_factor}; "
                           "Switchyard routes BOFT with butterfly factor 1 only (PEFT runs larger factors only with "
                           "its CUDA extension, so there is no reference to check them against); retrain with "
                           "boft_n_butterfly_factor=1 (an adapter trained without that extension has factor-1 "
                           "weights whatever its config says: set the field to 1 in its adapter_config.json)")


def boft_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """BOFT per module: a `BlockRotation` of the input and an output scale (bias kept).

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its BOFTConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    from peft.tuners.boft.layer import BOFTLayer

    deltas = {}
    for name, _ in adapted_modules(tensors, ("boft_R",)):
        refuse_linear_only(modules, name, adapter_id, "BOFT")
        d_in, d_out = dims_of(modules, name, adapter_id)
        params = pop_tensor(tensors, name, "boft_R", adapter_id)  # [1, k, bs, bs]
        scale = pop_tensor(tensors, name, "boft_s", adapter_id)  # [out, 1]
        ok = params.dim() == 4 and params.shape[0] == 1 and params.shape[2] == params.shape[3]
        if not ok or params.shape[1] * params.shape[2] != d_in or scale.shape != (d_out, 1):
            raise AdapterError(f"adapter {adapter_id!r}: BOFT weights of module {name} (boft_R "
                               f"{tuple(params.shape)}, boft_s {tuple(scale.shape)}) do not fit the base module "
                               f"(in {d_in}, out {d_out}) with butterfly factor 1")
        with torch.no_grad():
            blocks = BOFTLayer.cayley_batch(None, params[0])  # PEFT's own Cayley transform, [k, bs, bs]
        deltas[name] = ModuleDelta(in_op=BlockRotation(blocks), out_scale=scale.flatten())
    refuse_leftovers(tensors, adapter_id)
    return deltas


KIND = Kind(peft_type="BOFT", title="BOFT", config_class="BOFTConfig", markers=("boft_R",),
            tensor_prefix="boft_", refuse=refuse_boft_options, deltas=boft_deltas)
