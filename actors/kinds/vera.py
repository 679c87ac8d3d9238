"""VeRA (PEFT `tuners/vera/`): `y = Wx + b + lambda_b * (B_shared (lambda_d * (A_shared x)))`.

Fold: A = diag(lambda_d) @ vera_A[:, :in], B = diag(lambda_b) @ vera_B[:out, :], so VeRA rows
mix with LoRA rows and one pair of shared projections serves layers of different shapes.
"""

from __future__ import annotations

from torch import nn

from actors.kinds.common import (
    AdapterError,
    Kind,
    ModuleDelta,
    PREFIX,
    WEIGHTS_FILE,
    adapted_modules,
    dims_of,
    pop_tensor,
    refuse_leftovers,
)
from actors.kinds.lora import refuse_lora_options


def refuse_vera_options(config, adapter_id: str) -> None:
    """Refuse VeRA options that cannot be routed, and adapters saved without their projections.

    Args:
        config: the adapter's VeraConfig.
        adapter_id: its id, for the message.

    Raises:
        AdapterError: naming the option and what to do instead.
    """
    refuse_lora_options(config, adapter_id)  # the options VeRA shares with LoRA (bias)
    if not config.save_projection:
        raise AdapterError(f"adapter {adapter_id!r} was saved without its VeRA projections (save_projection=False); "
                           "save it again with save_projection=True")


def vera_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """VeRA weights per module as a low-rank pair, the lambdas folded into A and B.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its VeraConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    shared_A = tensors.pop("base_model.vera_A", None)  # [r, max_in]
    shared_B = tensors.pop("base_model.vera_B", None)  # [max_out, r]
    if shared_A is None or shared_B is None:
        raise AdapterError(f"adapter {adapter_id!r}: VeRA projections vera_A/vera_B missing from {WEIGHTS_FILE}")
    deltas = {}
    for name, _ in adapted_modules(tensors, ("vera_lambda_d",)):
        if isinstance(modules.get(name), nn.Embedding):
            raise AdapterError(f"adapter {adapter_id!r}: VeRA on embedding {name} is not supported")
        d_in, d_out = dims_of(modules, name, adapter_id)
        lambda_d = tensors.pop(f"{PREFIX}{name}.vera_lambda_d")  # [r]
        lambda_b = pop_tensor(tensors, name, "vera_lambda_b", adapter_id)  # [out]
        if d_in > shared_A.shape[1] or d_out > shared_B.shape[0] or lambda_b.shape[0] != d_out \
                or lambda_d.shape[0] != shared_A.shape[0]:
            raise AdapterError(f"adapter {adapter_id!r}: VeRA weights of {name} do not fit the base module "
                               f"(in {d_in}, out {d_out})")
        A = lambda_d[:, None] * shared_A[:, :d_in]
        B = lambda_b[:, None] * shared_B[:d_out, :]
        deltas[name] = ModuleDelta(A, B)
    refuse_leftovers(tensors, adapter_id)
    return deltas


KIND = Kind(peft_type="VERA", title="VeRA", config_class="VeraConfig", markers=("vera_lambda_d",),
            tensor_prefix="vera_", refuse=refuse_vera_options, deltas=vera_deltas)
