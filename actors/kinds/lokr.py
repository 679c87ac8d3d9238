"""LoKr (PEFT `tuners/lokr/`), eval mode: `y = Wx + b + x dW^T`, `dW = kron(w1, w2) * alpha / r`,
each factor saved whole (`lokr_w1`, `lokr_w2`) or as a low-rank pair (`_a @ _b`); r and alpha
per module from `rank_pattern`/`alpha_pattern`.

dW is full rank, so it does not fold into the stacked low-rank form. Routed op:
`KroneckerDelta`, the identity kron(w1, w2) vec(X) = vec(w1 X w2^T) with X the input viewed as
`[in1, in2]`, on the rows of the adapter only: about (out1 in1 in2 + out1 out2 in2) multiply-adds
per token instead of out x in. PEFT's LoKr adapts torch Linear (and convolutions, which
Switchyard does not route); `rank_dropout`/`module_dropout` act in training only.
"""

from __future__ import annotations

import torch
from torch import nn

from actors.kinds.common import AdapterError, Kind, ModuleDelta, PREFIX, adapted_modules, dims_of, pattern_value, \
    pop_tensor, refuse_leftovers, refuse_nothing
from actors.kinds.oft import refuse_linear_only


class KroneckerDelta:
    """`x -> x @ kron(w1, w2)^T` on the last dimension, without forming the Kronecker product."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor) -> None:
        self.w1, self.w2 = w1, w2  # [out1, in1] (scaling folded in), [out2, in2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out1, in1), (out2, in2) = self.w1.shape, self.w2.shape
        X = x.reshape(*x.shape[:-1], in1, in2)  # [N, T, in1, in2]
        Y = torch.matmul(self.w1, X @ self.w2.T)  # [N, T, out1, out2]
        return Y.reshape(*x.shape[:-1], out1 * out2)

    def to(self, ref: torch.Tensor) -> KroneckerDelta:
        return KroneckerDelta(self.w1.to(device=ref.device, dtype=ref.dtype),
                              self.w2.to(device=ref.device, dtype=ref.dtype))



def lokr_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """LoKr per module, as a `KroneckerDelta` added to the output.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its LoKrConfig.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    deltas = {}
    for name, _ in adapted_modules(tensors, ("lokr_w1", "lokr_w1_a")):
        refuse_linear_only(modules, name, adapter_id, "LoKr")
        d_in, d_out = dims_of(modules, name, adapter_id)
        if f"{PREFIX}{name}.lokr_t2" in tensors:
            raise AdapterError(f"adapter {adapter_id!r}: module {name} has a LoKr CP tensor (lokr_t2, "
                               "use_effective_conv2d), which only convolutions use")
        w1, w2 = _factor(tensors, name, "lokr_w1", adapter_id), _factor(tensors, name, "lokr_w2", adapter_id)
        if w1.dim() != 2 or w2.dim() != 2 or (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]) != (d_out, d_in):
            raise AdapterError(f"adapter {adapter_id!r}: LoKr factors of module {name} ({tuple(w1.shape)} x "
                               f"{tuple(w2.shape)}) do not fit the base module (in {d_in}, out {d_out})")
        scale = pattern_value(config.alpha_pattern, name, config.alpha) / pattern_value(config.rank_pattern, name,
                                                                                         config.r)
        deltas[name] = ModuleDelta(add_op=KroneckerDelta(w1 * scale, w2))
    refuse_leftovers(tensors, adapter_id)
    return deltas


def _factor(tensors: dict, name: str, factor: str, adapter_id: str) -> torch.Tensor:
    """One Kronecker factor: saved whole, or the product of its low-rank pair."""
    whole = tensors.pop(f"{PREFIX}{name}.{factor}", None)
    if whole is not None:
        return whole
    a, b = pop_tensor(tensors, name, f"{factor}_a", adapter_id), pop_tensor(tensors, name, f"{factor}_b", adapter_id)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise AdapterError(f"adapter {adapter_id!r}: {factor}_a {tuple(a.shape)} and {factor}_b {tuple(b.shape)} of "
                           f"module {name} do not multiply")
    return a @ b


KIND = Kind(peft_type="LOKR", title="LoKr", config_class="LoKrConfig", markers=("lokr_w1", "lokr_w1_a"),
            tensor_prefix="lokr_", refuse=refuse_nothing, deltas=lokr_deltas)
