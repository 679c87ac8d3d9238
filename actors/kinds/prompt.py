"""Prompt tuning and P-tuning (PEFT `tuners/prompt_tuning/`, `tuners/p_tuning/`), loaded for
inference: n learned vectors ("virtual tokens") are put in front of the row's token
embeddings, `inputs_embeds = cat(P, embed(ids))`, the attention mask gets n ones in front,
and positions run 0..n+L-1 (PEFT's `PeftModelForCausalLM.forward`). P-tuning saves its
prompt encoder's output, so at inference it is prompt tuning.

Saved key: `prompt_embeddings` [n * num_transformer_submodules, d]. Nothing is routed per
module: the runtime keeps each slot's P and the task puts it in front of that slot's rows
(`TextTask._inputs`). PEFT's forward depends on the class its `task_type` picks, so an
adapter must carry the task_type of the task it runs under: CAUSAL_LM for generate, SEQ_CLS
for classify and FEATURE_EXTRACTION for embed (encoders only, see `_task_type`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from actors.kinds.common import WEIGHTS_FILE, AdapterError, Kind, ModuleDelta
from actors.kinds.tokens import input_embedding

KEY = "prompt_embeddings"
CAUSAL_LM = "CAUSAL_LM"  # the task_type whose PEFT class runs prompts for generation


def refuse_prompt_options(config, adapter_id: str) -> None:
    """Refuse encoder-decoder prompts (two transformer submodules).

    Args:
        config: the adapter's PromptTuningConfig or PromptEncoderConfig.
        adapter_id: its id, for messages.

    Raises:
        AdapterError: naming the option.
    """
    if config.num_transformer_submodules not in (None, 1):
        raise AdapterError(f"adapter {adapter_id!r} has num_transformer_submodules="
                           f"{config.num_transformer_submodules} (an encoder-decoder prompt); Switchyard routes "
                           "prompts of decoder-only and encoder-only models only")


def no_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """Prompt learning changes no module: the virtual tokens are read by `virtual_tokens`."""
    return {}


def virtual_tokens(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> torch.Tensor:
    """The adapter's virtual tokens `[n, d]`, checked against the model and the task.

    Args:
        tensors: the adapter's tensors; `prompt_embeddings` is consumed (heads stay).
        config: its PromptTuningConfig or PromptEncoderConfig.
        modules: the untouched base model's modules, by name ("" is the model itself).
        adapter_id: its id, for messages.

    Returns:
        The virtual token embeddings, float32.

    Raises:
        AdapterError: a task Switchyard does not route prompts for, a task_type PEFT would
            not run the prompt under, or a tensor that does not fit the model.
    """
    model = modules[""]
    wanted = _task_type(model)
    if wanted is None:
        raise AdapterError(f"adapter {adapter_id!r} is a {config.peft_type.value} adapter; Switchyard routes prompt "
                           "learning for generate and classify on decoder models (classify where the model takes "
                           "position_ids) and for classify and embed on encoder models (BERT-style) only, not for a "
                           f"{type(model).__name__}")
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type != wanted:
        raise AdapterError(f"adapter {adapter_id!r} has task_type {task_type}; PEFT runs its prompt on a "
                           f"{type(model).__name__} only as {wanted} (with another task_type PEFT ignores the prompt "
                           f"or runs another model class): set task_type to {wanted} in its adapter_config.json if it "
                           "was trained for this task")
    if KEY not in tensors:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} lacks {KEY}")
    prompt = tensors.pop(KEY)
    d = modules[input_embedding(modules)].embedding_dim  # a routed layer may wrap it by now
    if prompt.dim() != 2 or tuple(prompt.shape) != (config.num_virtual_tokens, d):
        raise AdapterError(f"adapter {adapter_id!r}: {KEY} has shape {tuple(prompt.shape)}, expected "
                           f"({config.num_virtual_tokens}, {d}) for num_virtual_tokens {config.num_virtual_tokens} "
                           "and the model's embedding size")
    return prompt


def _task_type(model: nn.Module) -> str | None:
    """The task_type under which PEFT runs a prompt on `model` as Switchyard's task does:
    CAUSAL_LM for a causal LM; SEQ_CLS for a sequence classifier (a decoder's only where its
    forward takes position_ids: with embeddings in, transformers pools the last position, so
    the rows are left-padded with explicit positions); FEATURE_EXTRACTION for an encoder's
    bare model (pooled over the real tokens). None for anything else."""
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return CAUSAL_LM
    if name in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        positions = "position_ids" in inspect.signature(model.forward).parameters
        return "SEQ_CLS" if is_encoder(model.config) or positions else None
    return "FEATURE_EXTRACTION" if is_encoder(model.config) and name in auto.MODEL_MAPPING_NAMES.values() else None


def is_encoder(model_config) -> bool:
    """Whether the model is a BERT-style encoder (its type has a masked-LM head): such a
    model pools a fixed position or every token, and is padded on the right."""
    from transformers.models.auto import modeling_auto as auto

    return model_config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


PROMPT_TUNING = Kind(peft_type="PROMPT_TUNING", title="prompt tuning", config_class="PromptTuningConfig",
                     markers=(), tensor_prefix=KEY, refuse=refuse_prompt_options, deltas=no_deltas,
                     virtual=virtual_tokens)
P_TUNING = Kind(peft_type="P_TUNING", title="P-tuning", config_class="PromptEncoderConfig", markers=(),
                tensor_prefix=KEY, refuse=refuse_prompt_options, deltas=no_deltas, virtual=virtual_tokens)
