"""Prompt tuning and P-tuning (PEFT `tuners/prompt_tuning/`, `tuners/p_tuning/`), loaded for
inference: n learned vectors ("virtual tokens") are put in front of the row's token
embeddings, `inputs_embeds = cat(P, embed(ids))`, the attention mask gets n ones in front,
and positions run 0..n+L-1 (PEFT's `PeftModelForCausalLM.forward`). P-tuning saves its
prompt encoder's output, so at inference it is prompt tuning.

Saved key: `prompt_embeddings` [n * num_transformer_submodules, d]. Nothing is routed per
module: the runtime keeps each slot's P and the task puts it in front of that slot's rows
(`actors/tasks/generate.py`). PEFT's forward depends on the class its `task_type` picks,
so an adapter must carry the task_type of the task it runs under (CAUSAL_LM for generate);
generate is the one task routed so far.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.kinds.common import WEIGHTS_FILE, AdapterError, Kind, ModuleDelta, refuse_leftovers
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
        tensors: the adapter's tensors; consumed.
        config: its PromptTuningConfig or PromptEncoderConfig.
        modules: the untouched base model's modules, by name ("" is the model itself).
        adapter_id: its id, for messages.

    Returns:
        The virtual token embeddings, float32.

    Raises:
        AdapterError: a task Switchyard does not route prompts for, a task_type PEFT would
            not run the prompt under, or a tensor that does not fit the model.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model = modules[""]
    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise AdapterError(f"adapter {adapter_id!r} is a {config.peft_type.value} adapter; Switchyard routes prompt "
                           f"learning for --task generate only so far, not for a {type(model).__name__}")
    task_type = getattr(config.task_type, "value", config.task_type)
    if task_type != CAUSAL_LM:
        raise AdapterError(f"adapter {adapter_id!r} has task_type {task_type}; PEFT runs its prompt for generation "
                           f"only as {CAUSAL_LM} (with another task_type PEFT ignores the prompt): set task_type to "
                           f"{CAUSAL_LM} in its adapter_config.json if it was trained for generation")
    if KEY not in tensors:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} lacks {KEY}")
    prompt = tensors.pop(KEY)
    d = modules[input_embedding(modules)].embedding_dim  # a routed layer may wrap it by now
    if prompt.dim() != 2 or tuple(prompt.shape) != (config.num_virtual_tokens, d):
        raise AdapterError(f"adapter {adapter_id!r}: {KEY} has shape {tuple(prompt.shape)}, expected "
                           f"({config.num_virtual_tokens}, {d}) for num_virtual_tokens {config.num_virtual_tokens} "
                           "and the model's embedding size")
    refuse_leftovers(tensors, adapter_id)
    return prompt


PROMPT_TUNING = Kind(peft_type="PROMPT_TUNING", title="prompt tuning", config_class="PromptTuningConfig",
                     markers=(), tensor_prefix=KEY, refuse=refuse_prompt_options, deltas=no_deltas,
                     virtual=virtual_tokens)
P_TUNING = Kind(peft_type="P_TUNING", title="P-tuning", config_class="PromptEncoderConfig", markers=(),
                tensor_prefix=KEY, refuse=refuse_prompt_options, deltas=no_deltas, virtual=virtual_tokens)
