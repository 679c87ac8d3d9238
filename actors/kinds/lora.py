"""LoRA (PEFT `tuners/lora/`): `y = Wx + b + s * B A x (+ s * lora_B.bias)`,
s = alpha/r (alpha/sqrt(r) with rsLoRA), per module `rank_pattern`/`alpha_pattern`.

Fold: A = lora_A, B = lora_B * s, bias = lora_B.bias * s; LoRA on an Embedding reads
`lora_embedding_A` [r, vocab] and `lora_embedding_B` [out, r].

DoRA (`use_dora`, PEFT `lora/dora.py`, `lora/variants.py`): `y = m / ||W + s B A|| * (Wx + s B A x) + b`,
the norm per output row over the inputs (Conv1D transposed first; an Embedding's per hidden
dimension over the whole vocabulary, times its `embed_scale`), detached, from the saved
magnitude m (`lora_magnitude_vector` [out]). With g = m / ||W + s B A||, computed once at load
from the base weights: out_scale = g with the bias unscaled, and B = g * lora_B * s.

`trainable_token_indices`: see `actors/kinds/tokens.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from actors.kinds.common import (
    AdapterError,
    Kind,
    ModuleDelta,
    PREFIX,
    adapted_modules,
    check_base_copy,
    check_shapes,
    dims_of,
    pattern_value,
    pop_tensor,
    refuse_leftovers,
)
from actors.kinds.tokens import token_deltas

# LoRA options whose arithmetic is not a plain low-rank delta over the shared base weights.
UNROUTABLE_LORA_OPTIONS = (
    "use_dora", "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "layer_replication",
    "target_parameters", "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
    "megatron_config",
)
# The variants LoRA itself routes (AdaLoRA and VeRA share LoRA's fields but not these).
LORA_VARIANTS = ("use_dora", "trainable_token_indices")
DORA_NORM_CHUNK = 8192  # input columns per step of the DoRA norm (an Embedding's whole vocabulary)
# Initialisations that rewrite the base weights, so the adapter only fits a modified base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


def refuse_variants_and_biases(config, adapter_id: str, title: str, bias_hint: str = "",
                               allowed: tuple[str, ...] = ()) -> None:
    """Refuse the LoRA variants (`UNROUTABLE_LORA_OPTIONS`) and trained base biases, for LoRA
    and the types whose configs share LoRA's fields (AdaLoRA).

    Args:
        config: the adapter's PEFT config.
        adapter_id: its id, for the message.
        title: the type's name in the advice ("use plain LoRA").
        bias_hint: what else the type allows besides bias='none'.
        allowed: options of `UNROUTABLE_LORA_OPTIONS` the type routes after all.

    Raises:
        AdapterError: naming the option and what to do instead.
    """
    for option in UNROUTABLE_LORA_OPTIONS:
        if option not in allowed and getattr(config, option, None):
            raise AdapterError(f"adapter {adapter_id!r} uses {option}={getattr(config, option)!r}, which Switchyard "
                               f"cannot route per row; use plain {title}")
    if getattr(config, "bias", "none") != "none":
        raise AdapterError(f"adapter {adapter_id!r} trains base biases (bias={config.bias!r}); Switchyard shares one "
                           f"base model between adapters, so only bias='none'{bias_hint} is supported")


def refuse_lora_options(config, adapter_id: str) -> None:
    """Refuse LoRA config options that change the arithmetic beyond a low-rank delta.

    Args:
        config: the adapter's PEFT config (LoRA, or a config sharing LoRA's fields).
        adapter_id: its id, for the message.

    Raises:
        AdapterError: naming the option and what to do instead.
    """
    refuse_variants_and_biases(config, adapter_id, "LoRA", " (or lora_bias=True)", allowed=LORA_VARIANTS)
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise AdapterError(f"adapter {adapter_id!r} was initialised with {init!r}, which rewrites the base weights; "
                           "convert it to plain LoRA with PEFT's path_initial_model_for_weight_conversion")


def lora_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """LoRA weights per module, scaling folded into B.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its LoraConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    deltas = {}
    for name, marker in adapted_modules(tensors, ("lora_A.weight", "lora_embedding_A")):
        dims = dims_of(modules, name, adapter_id)
        check_base_copy(tensors, name, modules[name], adapter_id)
        if marker == "lora_embedding_A":
            A, B, bias = tensors.pop(f"{PREFIX}{name}.lora_embedding_A"), pop_tensor(tensors, name, "lora_embedding_B",
                                                                                   adapter_id), None
        else:
            A, B = tensors.pop(f"{PREFIX}{name}.lora_A.weight"), pop_tensor(tensors, name, "lora_B.weight", adapter_id)
            bias = tensors.pop(f"{PREFIX}{name}.lora_B.bias", None)
        r = A.shape[0]
        r_config = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        check_shapes(adapter_id, name, dims, A, B, bias, r_config)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        deltas[name] = ModuleDelta(A, B * scale, None if bias is None else bias * scale)
        if config.use_dora:
            _apply_dora(deltas[name], tensors, modules[name], name, adapter_id)
    for name, delta in token_deltas(tensors, config, modules, adapter_id).items():
        if name in deltas:
            raise AdapterError(f"adapter {adapter_id!r} has both LoRA weights and trainable tokens on {name}; "
                               "Switchyard routes one or the other per module")
        deltas[name] = delta
    refuse_leftovers(tensors, adapter_id)
    return deltas


def _apply_dora(delta: ModuleDelta, tensors: dict, module: nn.Module, name: str, adapter_id: str) -> None:
    """Turn a folded LoRA delta into DoRA's: g = m / ||W + B A|| as out_scale, B scaled by g."""
    magnitude = pop_tensor(tensors, name, "lora_magnitude_vector", adapter_id)  # [out]
    if tuple(magnitude.shape) != (delta.B.shape[0],):
        raise AdapterError(f"adapter {adapter_id!r}: lora_magnitude_vector of module {name} has shape "
                           f"{tuple(magnitude.shape)}, expected ({delta.B.shape[0]},)")
    gain = magnitude / _dora_norm(module, delta)
    delta.out_scale, delta.B = gain, delta.B * gain[:, None]


def _dora_norm(module: nn.Module, delta: ModuleDelta) -> torch.Tensor:
    """||W + B A|| per output row (B already scaled), as PEFT's `get_weight_norm`, summed over
    chunks of the inputs; ones on a meta-device base (the driver's shape check)."""
    weight = module.weight.detach()
    if weight.is_meta:
        return torch.ones(delta.B.shape[0])
    rows_are_outputs = isinstance(module, nn.Linear)  # Conv1D [in, out] and Embedding [vocab, d]: transposed
    squares = torch.zeros(delta.B.shape[0], dtype=torch.float64)
    for start in range(0, delta.A.shape[1], DORA_NORM_CHUNK):
        cols = slice(start, start + DORA_NORM_CHUNK)
        W = (weight[:, cols] if rows_are_outputs else weight[cols].T).float().cpu()  # [out, chunk]
        squares += ((W + delta.B @ delta.A[:, cols]) ** 2).sum(1, dtype=torch.float64)
    return squares.sqrt().float()


KIND = Kind(peft_type="LORA", title="LoRA", config_class="LoraConfig", markers=("lora_A.weight", "lora_embedding_A"),
            tensor_prefix="lora_", refuse=refuse_lora_options, deltas=lora_deltas)
