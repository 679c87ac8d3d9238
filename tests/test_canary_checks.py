"""The canary's checks that a self-consistent Switchyard can still fail: a wrong read of an
adapter (against PEFT's own layer), a routed layer the model never calls, a model that packs
away its padding (seen only with ragged rows), and a misrouted adapter whose effect is small
next to the output's size."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification

import actors.canary
import actors.runtime
from actors import Predictor
from actors.canary import check_routing
from testkit.adapters import save_adapter

READ_WRONGLY = r"start-up canary: adapter '{}' on module {} differs from PEFT's own layer for it by [0-9.e+-]+"
DIFFERS = r"start-up canary: rows of adapter '{}' in a mixed batch differ from running it alone"


def _misread(monkeypatch, adapter_id: str, edit) -> None:
    """Make the runtime read `adapter_id` through `edit(weights)` (a simulated reader bug)."""
    real = actors.runtime.read_adapter

    def read(path, name, base):
        weights = real(path, name, base)
        if name == adapter_id:
            edit(weights)
        return weights

    monkeypatch.setattr(actors.runtime, "read_adapter", read)


def test_a_wrongly_scaled_read_is_refused(llama, monkeypatch):
    model, store = llama
    module = "model.layers.0.self_attn.q_proj"

    def forget_rslora(weights):  # alpha / r where rsLoRA means alpha / sqrt(r)
        delta = weights.deltas[module]
        delta.B = delta.B / delta.rank ** 0.5

    _misread(monkeypatch, "lora-rs", forget_rslora)
    with pytest.raises(RuntimeError, match=READ_WRONGLY.format("lora-rs", module)):
        Predictor(model=model, adapters=store, task="generate", max_new_tokens=2)


def test_a_dropped_module_is_refused(bert, monkeypatch):
    model, store = bert
    module = "bert.encoder.layer.1.attention.self.value"
    _misread(monkeypatch, "no-head", lambda weights: weights.deltas.pop(module))
    with pytest.raises(RuntimeError, match=READ_WRONGLY.format("no-head", module)):
        Predictor(model=model, adapters=store, task="classify")


def test_a_routed_layer_the_model_does_not_call_is_refused(bert):
    """Issue 9's first defect in small: the layer exists and is right, but nothing calls it."""
    model, store = bert
    predictor = Predictor(model=model, adapters=store, task="classify", canary=False)
    name = "bert.encoder.layer.0.attention.self.query"
    layer = predictor.runtime.lowrank_layers[name]
    parent, _, child = name.rpartition(".")
    setattr(predictor.runtime.base.modules[parent], child, layer.base_layer)  # bypass the routed layer
    with pytest.raises(RuntimeError, match=f"the model calls {name} without the routed layer"):
        check_routing(predictor)


class _PackedTokens(nn.Module):
    """Runs `inner` on the real tokens only, packed into one [tokens, features] matrix, as
    unpadded attention implementations do; padded positions get zeros."""

    def __init__(self, inner: nn.Module, masks: list) -> None:
        super().__init__()
        self.inner, self.masks = inner, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks[-1].bool()  # [B, T]
        packed = self.inner(x[mask])  # [tokens, out]: row-major, like an unpadded varlen batch
        out = packed.new_zeros(*mask.shape, packed.shape[-1])
        out[mask] = packed
        return out


def _pack_first_query(predictor) -> None:
    """Make layer 0's routed query projection see packed tokens instead of [B, T] rows."""
    masks: list = []
    predictor.task.model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    attention = predictor.task.model.bert.encoder.layer[0].attention.self
    attention.query = _PackedTokens(attention.query, masks)


def test_a_model_that_packs_away_padding_is_refused_only_with_ragged_rows(bert, monkeypatch):
    model, store = bert
    predictor = Predictor(model=model, adapters=store, task="classify", canary=False)
    _pack_first_query(predictor)
    monkeypatch.setattr(actors.canary, "RAGGED_STEP", 0)  # rows of one length: packing changes nothing
    check_routing(predictor)
    monkeypatch.setattr(actors.canary, "RAGGED_STEP", 1)
    with pytest.raises(RuntimeError, match="Switchyard cannot route"):
        check_routing(predictor)


class _Reversed(nn.Module):
    """Runs `inner` on its input's rows in reverse order, then restores the order."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.flip(0)).flip(0)


def test_a_misrouted_adapter_with_a_small_effect_is_refused(bert, tmp_path, monkeypatch):
    """Two adapters whose effect on the scores is far below the output's size: a tolerance
    scaled by the output alone lets their misrouting through."""
    model = bert[0]
    store = tmp_path / "store"
    for seed, name in enumerate(["faint-a", "faint-b"], start=1):
        save_adapter(model, store, name, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                                    target_modules=["query", "value"]),
                     model_class=AutoModelForSequenceClassification, seed=seed)
        file = store / name / "adapter_model.safetensors"
        tensors = load_file(str(file))
        save_file({k: v * (0.005 if "lora_B" in k else 1.0) for k, v in tensors.items()}, str(file))
    predictor = Predictor(model=model, adapters=str(store), task="classify")  # passes while routing is right
    attention = predictor.task.model.bert.encoder.layer[0].attention.self
    attention.query = _Reversed(attention.query)
    tolerance = actors.canary.MODEL_TOLERANCE
    monkeypatch.setattr(actors.canary, "MODEL_TOLERANCE", {"full": (1e-3, 0.0)})  # the old rule
    check_routing(predictor)  # misses it
    monkeypatch.setattr(actors.canary, "MODEL_TOLERANCE", tolerance)
    with pytest.raises(RuntimeError, match=DIFFERS.format("faint-a")):
        check_routing(predictor)


def test_the_module_check_builds_peft_layers_only_around_the_shared_base_modules(bert, tmp_path):
    """PEFT's layers reference the base model's modules; building them changes no base weight."""
    model, store = bert
    shutil.copytree(store, tmp_path / "store")
    predictor = Predictor(model=model, adapters=str(tmp_path / "store"), task="classify", canary=False)
    before = {k: v.clone() for k, v in predictor.task.model.state_dict().items()}
    layers = actors.canary._peft_layers(predictor.runtime, "vera")
    assert sorted(layers) == sorted(n for n, layer in predictor.runtime.lowrank_layers.items()
                                    if predictor.runtime.loaded_ids.index("vera") + 1 in layer.used)
    after = predictor.task.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(layers[n].base_layer is predictor.runtime.base.modules[n] for n in layers)
