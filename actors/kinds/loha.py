"""LoHa (PEFT `tuners/loha/`), eval mode: `y = Wx + b + x dW^T`,
`dW = ((w1a @ w1b) * (w2a @ w2b)) * alpha / r` (Hadamard product of two rank-r products),
r and alpha per module from `rank_pattern`/`alpha_pattern`.

Saved keys per module: `.hada_w1_a` [out, r], `.hada_w1_b` [r, in], `.hada_w2_a`, `.hada_w2_b`.
Fold (exact, rank r^2, the Khatri-Rao product):
    B'[o, (p, q)] = w1a[o, p] * w2a[o, q] * alpha / r,   A'[(p, q), i] = w1b[p, i] * w2b[q, i],
since (w1a w1b)[o, i] (w2a w2b)[o, i] = sum_{p, q} w1a[o, p] w2a[o, q] w1b[p, i] w2b[q, i].
PEFT's LoHa adapts torch Linear (and convolutions, which Switchyard does not route), not
GPT-2's Conv1D nor Embedding; `rank_dropout`/`module_dropout` act in training only.
"""

from __future__ import annotations

from torch import nn

from actors.kinds.common import (
    AdapterError,
    Kind,
    ModuleDelta,
    PREFIX,
    adapted_modules,
    dims_of,
    pattern_value,
    pop_tensor,
    refuse_leftovers,
    refuse_nothing,
)

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")



def loha_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """LoHa weights per module, folded exactly into a rank-r^2 low-rank pair.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its LoHaConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    deltas = {}
    for name, _ in adapted_modules(tensors, ("hada_w1_a",)):
        _refuse_module(modules, name, adapter_id)
        d_in, d_out = dims_of(modules, name, adapter_id)
        if f"{PREFIX}{name}.hada_t1" in tensors or f"{PREFIX}{name}.hada_t2" in tensors:
            raise AdapterError(f"adapter {adapter_id!r}: module {name} has LoHa CP tensors (hada_t1/hada_t2, "
                               "use_effective_conv2d), which only convolutions use; Switchyard routes LoHa on Linear "
                               "modules only")
        w1a, w1b, w2a, w2b = (pop_tensor(tensors, name, f, adapter_id) for f in _FACTORS)
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.alpha)
        _check_factors(adapter_id, name, (d_in, d_out), r, w1a, w1b, w2a, w2b)
        A = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, d_in)  # [(p, q), in]
        B = (w1a[:, :, None] * w2a[:, None, :]).reshape(d_out, r * r) * (alpha / r)  # [out, (p, q)]
        deltas[name] = ModuleDelta(A, B)
    refuse_leftovers(tensors, adapter_id)
    return deltas


def _refuse_module(modules: dict[str, nn.Module], name: str, adapter_id: str) -> None:
    """Refuse LoHa on anything but a torch Linear: PEFT's LoHa cannot load it on Conv1D or
    Embedding (no oracle), and Switchyard does not route convolutions."""
    module = modules.get(name)
    if module is not None and not isinstance(module, nn.Linear):
        raise AdapterError(f"adapter {adapter_id!r}: LoHa on module {name} of type {type(module).__name__} is not "
                           "supported: Switchyard routes LoHa on torch Linear modules only (PEFT's LoHa has no layer "
                           "for GPT-2's Conv1D or for Embedding, and Switchyard does not route convolutions); drop it "
                           "from target_modules or train LoRA for it")


def _check_factors(adapter_id: str, name: str, dims: tuple[int, int], r: int, w1a, w1b, w2a, w2b) -> None:
    """Refuse LoHa factors whose shapes do not fit the base module or the config's rank."""
    d_in, d_out = dims
    want = {"hada_w1_a": (d_out, r), "hada_w1_b": (r, d_in), "hada_w2_a": (d_out, r), "hada_w2_b": (r, d_in)}
    for factor, tensor in zip(_FACTORS, (w1a, w1b, w2a, w2b)):
        if tuple(tensor.shape) != want[factor]:
            raise AdapterError(f"adapter {adapter_id!r}: {factor} of module {name} has shape {tuple(tensor.shape)}, "
                               f"but the base module (in {d_in}, out {d_out}) and the config's rank {r} need "
                               f"{want[factor]}")


KIND = Kind(peft_type="LOHA", title="LoHa", config_class="LoHaConfig", markers=("hada_w1_a",),
            tensor_prefix="hada_", refuse=refuse_nothing, deltas=loha_deltas)
