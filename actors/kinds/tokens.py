"""Trainable tokens (PEFT `tuners/trainable_tokens/`, LoRA's `trainable_token_indices`):
rows `idx` of the input embedding are replaced by the saved `trainable_tokens_delta` (values,
not differences), and so are the same columns of an output layer tied to it (PEFT's
`_get_module_names_tied_with_embedding`: `lm_head` when `tie_word_embeddings`), which PEFT
then runs without a bias.

Saved key: `<embedding>.token_adapter.trainable_tokens_delta` [len(idx), d].
Fold (exact, one-hot low rank, r = len(idx)), with D = delta - E[idx]:
    embedding:  A = onehot(idx) [r, vocab], B = D^T [d, r]    (E'[t] = E[t] + B A[:, t])
    tied head:  A = D [r, d], B = onehot(idx)^T [vocab, r]     (logits' columns idx)
On a meta-device base (the driver's check) E is unknown: only the shapes are built.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.kinds.common import AdapterError, ModuleDelta, dims_of, pop_tensor

DELTA = "token_adapter.trainable_tokens_delta"


def token_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """The input embedding's (and a tied output layer's) deltas of `trainable_token_indices`.

    Args:
        tensors: the adapter's tensors; the token delta is consumed.
        config: its LoraConfig.
        modules: the untouched base model's modules, by name ("" is the model itself).
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per changed module (none without `trainable_token_indices`).

    Raises:
        AdapterError: indices that are not distinct token ids of the vocabulary, or a form
            of `trainable_token_indices` Switchyard does not route.
    """
    if not config.trainable_token_indices:
        return {}
    name, indices, tied = token_targets(config, modules, adapter_id)
    vocab, d = dims_of(modules, name, adapter_id)
    values = pop_tensor(tensors, name, DELTA, adapter_id)  # [r, d]
    if tuple(values.shape) != (len(indices), d):
        raise AdapterError(f"adapter {adapter_id!r}: {DELTA} of {name} has shape {tuple(values.shape)}, expected "
                           f"({len(indices)}, {d})")
    onehot = torch.zeros(len(indices), vocab)
    onehot[torch.arange(len(indices)), torch.tensor(indices)] = 1.0
    D = values - _rows(modules[name].weight, indices)  # [r, d]
    deltas = {name: ModuleDelta(onehot, D.T, from_tokens=True)}
    for output in tied:
        deltas[output] = ModuleDelta(D.clone(), onehot.T.clone(), from_tokens=True)
    return deltas


def token_targets(config, modules: dict[str, nn.Module], adapter_id: str) -> tuple[str, list[int], list[str]]:
    """Where an adapter's `trainable_token_indices` act, as PEFT applies them.

    Args:
        config: its LoraConfig (with `trainable_token_indices`).
        modules: the untouched base model's modules, by name ("" is the model itself).
        adapter_id: its id, for messages.

    Returns:
        (input embedding name, token ids, names of the output layers tied to it).

    Raises:
        AdapterError: indices that are not distinct token ids of the vocabulary, or a form
            Switchyard does not route.
    """
    name = input_embedding(modules)
    indices = _embedding_indices(config.trainable_token_indices, name, adapter_id)
    vocab, _ = dims_of(modules, name, adapter_id)
    if len(set(indices)) != len(indices) or not all(isinstance(i, int) and 0 <= i < vocab for i in indices):
        raise AdapterError(f"adapter {adapter_id!r}: trainable_token_indices must be distinct token ids below the "
                           f"vocabulary size {vocab}, got {indices}")
    return name, indices, _tied_outputs(modules, name, adapter_id)


def input_embedding(modules: dict[str, nn.Module]) -> str:
    """The name of the model's input embedding among the untouched base modules (a routed
    layer may wrap it in the live model by now).

    Args:
        modules: the untouched base model's modules, by name ("" is the model itself).

    Returns:
        Its dotted module name.
    """
    embedding = modules[""].get_input_embeddings()
    while embedding not in modules.values() and hasattr(embedding, "base_layer"):
        embedding = embedding.base_layer
    return next(n for n, m in modules.items() if m is embedding)


def _embedding_indices(indices, name: str, adapter_id: str) -> list[int]:
    """The token ids for the input embedding: the list form, or a one-entry dict naming it."""
    if isinstance(indices, dict):
        if len(indices) != 1 or not name.endswith(next(iter(indices))):
            raise AdapterError(f"adapter {adapter_id!r}: trainable_token_indices names layers "
                               f"{sorted(indices)}; Switchyard routes trainable tokens of the input embedding "
                               f"({name}) only, given as a list of token ids or {{'{name}': [...]}}")
        indices = next(iter(indices.values()))
    return list(indices)


def _rows(weight: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """weight[indices] as float32 on the CPU (zeros on a meta-device base: shapes only)."""
    if weight.is_meta:
        return torch.zeros(len(indices), weight.shape[1])
    return weight.detach()[torch.tensor(indices, device=weight.device)].float().cpu()


def _tied_outputs(modules: dict[str, nn.Module], embedding: str, adapter_id: str) -> list[str]:
    """The output layers PEFT ties to the embedding's trainable tokens; refuse one with a bias
    (PEFT's tied layer drops it, a change to the base model no per-row op reproduces)."""
    from peft.utils.other import _get_module_names_tied_with_embedding

    # Names in the live model: a routed layer may wrap the output layer by now (`lm_head.base_layer`).
    names = (n.replace(".base_layer", "") for n in _get_module_names_tied_with_embedding(modules[""]))
    tied = list(dict.fromkeys(n for n in names if n != embedding))
    for name in tied:
        if getattr(modules[name], "bias", None) is not None:
            raise AdapterError(f"adapter {adapter_id!r}: trainable tokens tie {name} to {embedding}, and PEFT runs "
                               f"the tied {name} without its bias; Switchyard cannot route that. Use an untied model")
    return tied
