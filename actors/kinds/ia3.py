"""IA3 (PEFT `tuners/ia3/`), eval mode, one learned vector l per module:
not feed-forward `y = (Wx + b) * l` (bias scaled too); feed-forward `y = W(x * l) + b`.

Saved keys per module: `.ia3_l`, [out, 1] or [1, in]. Whether a module is feed-forward is
PEFT's own test of the config's `feedforward_modules` (`IA3Model._check_target_module_feedforward`),
never guessed from shapes. Routed: a per-slot output scale (bias scaled) or input scale.
PEFT's IA3 adapts torch Linear and GPT-2 Conv1D (and convolutions, not routed here).
"""

from __future__ import annotations

from torch import nn

from actors.kinds.common import AdapterError, Kind, ModuleDelta, adapted_modules, dims_of, pop_tensor, \
    refuse_leftovers, refuse_nothing



def ia3_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """IA3's vector per module, as an input or output scale.

    Args:
        tensors: the adapter's tensors (heads already taken); consumed.
        config: its IA3Config.
        modules: the untouched base model's modules, by name.
        adapter_id: its id, for messages.

    Returns:
        A ModuleDelta per adapted module.
    """
    from peft.tuners.ia3 import IA3Model

    deltas = {}
    for name, _ in adapted_modules(tensors, ("ia3_l",)):
        if isinstance(modules.get(name), nn.Embedding):
            raise AdapterError(f"adapter {adapter_id!r}: IA3 on embedding {name} is not supported (PEFT's IA3 has no "
                               "Embedding layer); drop it from target_modules")
        d_in, d_out = dims_of(modules, name, adapter_id)
        vector = pop_tensor(tensors, name, "ia3_l", adapter_id)
        feedforward = IA3Model._check_target_module_feedforward(config, name)
        want = (1, d_in) if feedforward else (d_out, 1)
        if tuple(vector.shape) != want:
            raise AdapterError(f"adapter {adapter_id!r}: ia3_l of module {name} has shape {tuple(vector.shape)}, but "
                               f"the base module (in {d_in}, out {d_out}) needs {want} as a "
                               f"{'feed-forward' if feedforward else 'non-feed-forward'} module of its config")
        if feedforward:
            deltas[name] = ModuleDelta(in_scale=vector.flatten())
        else:
            deltas[name] = ModuleDelta(out_scale=vector.flatten(), scale_bias=True)
    refuse_leftovers(tensors, adapter_id)
    return deltas


KIND = Kind(peft_type="IA3", title="IA3", config_class="IA3Config", markers=("ia3_l",),
            tensor_prefix="ia3_", refuse=refuse_nothing, deltas=ia3_deltas)
