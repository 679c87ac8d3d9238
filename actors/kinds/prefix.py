"""Prefix tuning (PEFT `tuners/prefix_tuning/`), loaded for inference: each layer's attention
sees n learned keys and values in front of the row's own, as if n tokens had been cached
before it. PEFT's `get_prompt` views the saved tensor as `[n, layers * 2, heads, head_dim]`
(layer l's key is slice 2l, its value 2l + 1; `heads` is the model's key-value heads),
puts it in the cache without RoPE, adds n ones in front of the attention mask, and the
row's tokens take positions n, n + 1, ...

Saved key: `prompt_embeddings` [n, layers * 2 * heads * head_dim] (with `prefix_projection`
the projection's output is what is saved). Nothing is routed per module: the runtime keeps
each slot's prefix and the task builds one cache for the whole call (`TextTask._inputs`),
each row's prefix right-aligned in P = the call's longest prefix, the other slots masked.

PEFT runs a prefix where the model takes a cache: generate on decoders (task_type
CAUSAL_LM) and embed on BERT encoders (FEATURE_EXTRACTION). It raises for sequence
classification on transformers 5, so no oracle exists there: refused.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from actors.kinds.common import WEIGHTS_FILE, AdapterError, Kind
from actors.kinds.prompt import CAUSAL_LM, KEY, no_deltas, refuse_prompt_options

FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
ENCODERS = ("bert",)  # encoders whose positions are `cache length + arange`, as tested against PEFT


def prefix_states(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> torch.Tensor:
    """The adapter's prefix keys and values `[layers * 2, heads, n, head_dim]`, checked
    against the model and the task.

    Args:
        tensors: the adapter's tensors; `prompt_embeddings` is consumed.
        config: its PrefixTuningConfig.
        modules: the untouched base model's modules, by name ("" is the model itself).
        adapter_id: its id, for messages.

    Returns:
        Layer l's keys at index 2l and its values at 2l + 1, float32.

    Raises:
        AdapterError: a model or task PEFT has no prefix oracle for, a task_type PEFT would
            not run the prefix under, or a tensor that does not fit the model's attention.
    """
    model = modules[""]
    wanted = _task_type(model, adapter_id)
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type != wanted:
        raise AdapterError(f"adapter {adapter_id!r} has task_type {task_type}; PEFT runs a prefix on a "
                           f"{type(model).__name__} only as {wanted}: set task_type to {wanted} in its "
                           "adapter_config.json if it was trained for this task")
    if KEY not in tensors:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} lacks {KEY}")
    layers, heads, head_dim = attention_shape(model)
    saved = tensors.pop(KEY)
    n = config.num_virtual_tokens
    if saved.dim() != 2 or tuple(saved.shape) != (n, layers * 2 * heads * head_dim):
        raise AdapterError(f"adapter {adapter_id!r}: {KEY} has shape {tuple(saved.shape)}, expected "
                           f"({n}, {layers * 2 * heads * head_dim}) for num_virtual_tokens {n} and the model's "
                           f"{layers} layers x key and value x {heads} key-value heads x head size {head_dim}")
    return saved.reshape(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3).contiguous()


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key-value heads, head size) of the model's attention, as PEFT sizes a prefix."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def _task_type(model: nn.Module, adapter_id: str) -> str:
    """CAUSAL_LM for a causal LM, FEATURE_EXTRACTION for a bare BERT encoder; refuses the
    rest with the reason."""
    from transformers.models.auto import modeling_auto as auto

    name, cfg = type(model).__name__, model.config.get_text_config()
    why = None
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        taken = inspect.signature(model.forward).parameters
        if "cache" not in taken or "position_ids" not in taken:
            why = "its forward takes no cache or no position_ids"
        elif getattr(cfg, "sliding_window", None) is not None or any(
                t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
            why = "it has sliding-window layers (left padding moves a row's prefix out of or into the window)"
        elif cfg.model_type in ("bloom", "gpt_bigcode") or cfg.model_type.startswith("gemma"):
            why = "PEFT reshapes its prefix cache in a model-specific way"
        else:
            return CAUSAL_LM
    elif name in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        why = ("PEFT raises for prefix tuning with sequence classification on transformers 5, so there is no "
               "reference to be exact against")
    elif name in auto.MODEL_MAPPING_NAMES.values() and cfg.model_type in ENCODERS:
        return FEATURE_EXTRACTION
    raise AdapterError(f"adapter {adapter_id!r} is a prefix tuning adapter on a {type(model).__name__}: "
                       + (f"not routed because {why}" if why else
                          "Switchyard routes prefix tuning for generate on decoder models and for embed on BERT "
                          "encoders only")
                       + "; use a LoRA adapter, or prompt tuning, for this model and task")


KIND = Kind(peft_type="PREFIX_TUNING", title="prefix tuning", config_class="PrefixTuningConfig", markers=(),
            tensor_prefix=KEY, refuse=refuse_prompt_options, deltas=no_deltas, prefix=prefix_states)
