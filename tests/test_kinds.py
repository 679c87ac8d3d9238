"""Every adapter kind of `actors/kinds/` in one mixed batch against the oracle (PEFT, one
adapter at a time, each row alone): LoRA, VeRA, AdaLoRA (plain and rank-pruned) and LoHa
rows with base rows, ragged lengths and fan-out rows, per architecture PEFT supports them
on; what PEFT cannot load is refused, naming the adapter."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import AdaLoraConfig, LoHaConfig
from safetensors.torch import load_file, save_file

import actors.runtime
import oracle
from actors import Predictor
from actors.kinds import KINDS
from testkit.adapters import save_adapter
from testkit.data import SENTENCES, png_bytes

WEIGHTS = "adapter_model.safetensors"
LLAMA_ADA_PRUNED = {  # rank_pattern as AdaLoRA's budgeting saves it: lora_E key -> init_r booleans
    "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False],
    "model.layers.0.self_attn.v_proj.lora_E": [False, False, False, False],  # pruned away
    "model.layers.1.self_attn.q_proj.lora_E": [True, True, True, True],
    "model.layers.1.self_attn.v_proj.lora_E": [False, True, False, False],
}
BERT_ADA_PRUNED = {
    "bert.encoder.layer.0.attention.self.query.lora_E": [True, False, True, False],
    "bert.encoder.layer.0.attention.self.value.lora_E": [False, False, False, False],
    "bert.encoder.layer.1.attention.self.value.lora_E": [False, True, True, True],
}


def _ada(**kw) -> AdaLoraConfig:
    return AdaLoraConfig(total_step=10, **kw)


def _store(model: str, root: Path, model_class, configs: dict, copies: dict | None = None) -> str:
    """A store with one saved adapter per config (seeded) plus copies of fixture adapters
    (`copies`: new id -> folder)."""
    from testkit.models import make_readable

    for seed, (name, config) in enumerate(configs.items(), start=11):
        save_adapter(model, root, name, config, model_class=model_class, seed=seed)
    for name, folder in (copies or {}).items():
        shutil.copytree(folder, root / name)
        make_readable(root / name)
    return str(root)


@pytest.fixture(scope="module")
def llama_kinds(llama, tmp_path_factory):
    """(model dir, store dir): Llama with LoRA, VeRA, AdaLoRA (plain, rank-pruned) and LoHa."""
    from transformers import AutoModelForCausalLM

    model, store = llama
    configs = {
        "ada": _ada(init_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "ada-pruned": _ada(init_r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern=LLAMA_ADA_PRUNED),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        "loha-pattern": LoHaConfig(r=2, alpha=4, target_modules=["k_proj", "o_proj", "gate_proj"],
                                   rank_pattern={"gate_proj": 3}, alpha_pattern={"o_proj": 12}),
    }
    copies = {"lora-qv": Path(store) / "lora-qv", "vera": Path(store) / "vera"}
    return model, _store(model, tmp_path_factory.mktemp("llama_kinds"), AutoModelForCausalLM, configs, copies)


@functools.lru_cache(maxsize=16)
def _predictor(model: str, store: str, task: str, **options) -> Predictor:
    """One Predictor per (model, store, task, options) for the module (runs the canary)."""
    return Predictor(model=model, adapters=store, task=task, **options)


def _same_as_oracle(model: str, store: str, row: dict, prompt: str, n_new: int) -> None:
    expected = oracle.generate(model, store, row["adapter_id"], prompt, n_new)
    assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
    assert row["error"] is None


# --- generation (Llama, GPT-2) ---------------------------------------------------------

def test_llama_every_kind_in_one_greedy_batch_equals_oracle(llama_kinds):
    model, store = llama_kinds
    p = _predictor(model, store, "generate", max_new_tokens=5)
    assert sorted(p.adapter_ids) == ["ada", "ada-pruned", "loha", "loha-pattern", "lora-qv", "vera"]
    cycle = [*p.adapter_ids, None, ""]
    adapters = [cycle[(3 * i) % len(cycle)] for i in range(16)]
    prompts = [SENTENCES[i % len(SENTENCES)][: 4 + 7 * (i % 5)] for i in range(16)]  # ragged: left padding
    out = p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist()
    assert {r["adapter_id"] for r in out} == set(adapters)
    for row in out:
        _same_as_oracle(model, store, row, row["prompt"], 5)


def test_llama_kinds_change_the_output(llama_kinds):
    """Guard against a vacuous oracle match: every new kind moves the logits off the base."""
    model, store = llama_kinds
    ids = oracle.processor(model, "generate")("the cat sat on the mat", return_tensors="pt")
    with torch.no_grad():
        base = oracle.oracle_model(model, store, None, "generate")(**ids).logits
        for adapter in ("ada", "ada-pruned", "loha", "loha-pattern"):
            logits = oracle.oracle_model(model, store, adapter, "generate")(**ids).logits
            assert (logits - base).norm() > 0.05 * base.norm(), adapter


def test_llama_fan_out_rows_name_adapters_of_different_kinds(llama_kinds):
    model, store = llama_kinds
    p = _predictor(model, store, "generate", max_new_tokens=4)
    named = [["loha", "ada", None], ["ada-pruned", "lora-qv"], None, ["vera", "loha-pattern", "loha"]]
    prompts = ["the cat", "a long way from home we", "hello", "we went to the"]
    out = p(pa.table({"prompt": prompts, "adapter_ids": pa.array(named, pa.list_(pa.string()))})).to_pylist()
    assert len(out) == 3 + 2 + 1 + 3
    for row in out:
        _same_as_oracle(model, store, row, row["prompt"], 4)


def test_llama_batches_without_some_kinds_equal_oracle(llama_kinds):
    """Zero rows of LoRA/VeRA (only the new kinds and base), then only one kind."""
    model, store = llama_kinds
    p = _predictor(model, store, "generate", max_new_tokens=4)
    for adapters in (["loha", None, "ada-pruned", "loha-pattern", "ada"], ["ada-pruned", "ada-pruned"]):
        prompts = [SENTENCES[i][: 6 + 9 * i] for i in range(len(adapters))]
        for row in p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist():
            _same_as_oracle(model, store, row, row["prompt"], 4)


def test_pruned_adalora_is_read_as_peft_loads_it(llama_kinds):
    """Pruned ranks fold with ranknum = init_r; the rank-0 module adds nothing and is not routed."""
    model, store = llama_kinds
    p = _predictor(model, store, "generate", max_new_tokens=4)
    layers = p.runtime.lowrank_layers
    slot = p.runtime._loaded["ada-pruned"]
    assert slot not in layers["model.layers.0.self_attn.v_proj"].used
    assert slot in layers["model.layers.1.self_attn.v_proj"].used


def test_adalora_without_the_empty_tensors_of_a_pruned_module_equals_oracle(llama_kinds, tmp_path):
    """PEFT leaves a rank-0 module empty whether or not its (empty) tensors were saved."""
    model, store = llama_kinds
    adapter = Path(shutil.copytree(Path(store) / "ada-pruned", tmp_path / "store" / "ada-slim"))
    tensors = load_file(str(adapter / WEIGHTS))
    save_file({k: v for k, v in tensors.items() if ".layers.0.self_attn.v_proj." not in k}, str(adapter / WEIGHTS))
    p = Predictor(model=model, adapters=str(tmp_path / "store"), task="generate", max_new_tokens=4)
    for row in p(pa.table({"prompt": ["the cat sat", "we"], "adapter_id": ["ada-slim", None]})).to_pylist():
        _same_as_oracle(model, str(tmp_path / "store"), row, row["prompt"], 4)


def test_gpt2_adalora_on_conv1d_equals_oracle(gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, store = gpt2
    configs = {"ada-conv": _ada(init_r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])}
    kinds = _store(model, tmp_path / "store", AutoModelForCausalLM, configs, {"attn": Path(store) / "attn"})
    p = _predictor(model, kinds, "generate", max_new_tokens=4)
    adapters = ["ada-conv", "attn", None, "ada-conv", ""]
    prompts = [SENTENCES[i][: 8 + 6 * i] for i in range(5)]
    for row in p(pa.table({"prompt": prompts, "adapter_id": adapters})).to_pylist():
        _same_as_oracle(model, kinds, row, row["prompt"], 4)


# --- classification and embeddings (BERT), images (ViT) ---------------------------------

@pytest.fixture(scope="module")
def bert_kinds(bert, tmp_path_factory):
    """(model dir, store dir): BERT classification, new kinds with and without their own head;
    a pruned AdaLoRA with lora_alpha 0 (PEFT then scales by each module's pruned rank)."""
    from transformers import AutoModelForSequenceClassification

    model, store = bert
    configs = {
        "ada-head": _ada(init_r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        "ada": _ada(init_r=6, lora_alpha=6, target_modules=["key", "dense"]),
        "ada-pruned": _ada(init_r=4, lora_alpha=0, target_modules=["query", "value"], rank_pattern=BERT_ADA_PRUNED),
        "loha-head": LoHaConfig(r=3, alpha=6, target_modules=["query", "key"], modules_to_save=["classifier"]),
        "loha": LoHaConfig(r=4, alpha=4, target_modules=["value", "dense"]),
    }
    copies = {"head-a": Path(store) / "head-a", "vera": Path(store) / "vera"}
    return model, _store(model, tmp_path_factory.mktemp("bert_kinds"), AutoModelForSequenceClassification, configs,
                         copies)


def test_bert_classify_every_kind_with_and_without_heads(bert_kinds):
    model, store = bert_kinds
    p = _predictor(model, store, "classify")
    cycle = [*p.adapter_ids, None]
    adapters = [cycle[(5 * i) % len(cycle)] for i in range(14)]
    texts = [SENTENCES[i % len(SENTENCES)][: 8 + 9 * (i % 4)] for i in range(14)]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


def test_bert_embed_new_kinds_equal_oracle(bert, bert_embed, tmp_path):
    from transformers import AutoModel

    model, embed_store = bert_embed
    configs = {"ada-emb": _ada(init_r=4, lora_alpha=8, target_modules=["query", "dense"]),
               "loha-emb": LoHaConfig(r=3, alpha=6, target_modules=["key", "value"])}
    store = _store(model, tmp_path / "store", AutoModel, configs, {"emb-a": Path(embed_store) / "emb-a"})
    p = _predictor(model, store, "embed")
    adapters = ["ada-emb", "loha-emb", "emb-a", None, "loha-emb", "ada-emb"]
    texts = [SENTENCES[i][: 6 + 11 * (i % 3)] for i in range(6)]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        expected = oracle.embedding(model, store, row["adapter_id"], row["text"])
        oracle.assert_close(row["embedding"], expected, what=str(row["adapter_id"]))


def test_vit_classify_image_new_kinds_equal_oracle(vit, tmp_path):
    from transformers import AutoModelForImageClassification

    model, vit_store = vit
    configs = {"ada-vit": _ada(init_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               modules_to_save=["classifier"]),
               "loha-vit": LoHaConfig(r=3, alpha=6, target_modules=["fc1", "fc2"])}
    store = _store(model, tmp_path / "store", AutoModelForImageClassification, configs,
                   {"vit-b": Path(vit_store) / "vit-b"})
    p = _predictor(model, store, "classify-image")
    adapters = ["ada-vit", "loha-vit", None, "vit-b", "loha-vit", "ada-vit"]
    images = [png_bytes(i, (40, 28)) for i in range(6)]
    out = p(pa.table({"image": images, "adapter_id": adapters, "k": list(range(6))})).to_pylist()
    for row in out:
        expected = oracle.scores(model, store, row["adapter_id"], "classify-image", images[row["k"]])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


TEXT_IDS = ["ada-head", "ada", "ada-pruned", "loha-head", "loha", "head-a", "vera"]
PROFILE = {"deadline": None, "derandomize": True, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}


@functools.lru_cache(maxsize=None)
def _expected_scores(model: str, store: str, adapter: str | None, text: str) -> tuple:
    return tuple(oracle.scores(model, store, adapter, "classify", text))


def check_random_mixed_batch(model: str, store: str, ids: list[str], data) -> None:
    """A hypothesis-drawn classify batch: any mix of `ids`, base rows and fan-out rows, split
    into model calls of 3 rows under a capacity of 3 adapters, row by row against the oracle."""
    n = data.draw(st.integers(1, 8))
    pick = st.sampled_from([None, *ids])
    named = data.draw(st.lists(st.lists(pick, min_size=1, max_size=3), min_size=n, max_size=n))
    texts = data.draw(st.lists(st.builds(lambda i, k: SENTENCES[i][:k], st.integers(0, len(SENTENCES) - 1),
                                         st.integers(3, 60)), min_size=n, max_size=n))
    p = _predictor(model, store, "classify", max_batch_rows=3, max_loaded_adapters=3)
    table = pa.table({"text": texts, "adapter_ids": pa.array(named, pa.list_(pa.string())), "k": list(range(n))})
    out = p(table).to_pylist()
    assert len(out) == sum(len(a) for a in named)
    for row in out:
        expected = _expected_scores(model, store, row["adapter_id"], texts[row["k"]])
        oracle.assert_close(row["scores"], expected, what=f"{row['adapter_id']} {texts[row['k']]!r}")


@settings(max_examples=12, **PROFILE)
@given(data=st.data())
def test_mixed_kind_batches_equal_the_oracle_row_by_row(bert_kinds, data):
    """Any mix of kinds, base rows and fan-out rows, under a tight adapter capacity."""
    check_random_mixed_batch(*bert_kinds, TEXT_IDS, data)


# --- the canary covers the new kinds ------------------------------------------------------

READ_WRONGLY = r"start-up canary: adapter '{}' on module {} differs from PEFT's own layer for it"


@pytest.mark.parametrize(("adapter", "module"), [("ada-pruned", "model.layers.0.self_attn.q_proj"),
                                                 ("loha-pattern", "model.layers.1.mlp.gate_proj")])
def test_canary_refuses_a_wrong_read_of_a_new_kind(llama_kinds, monkeypatch, adapter, module):
    """A reader that forgets AdaLoRA's ranknum (or scales LoHa by alpha/r of the default r)
    is caught against PEFT's own layer."""
    model, store = llama_kinds
    real = actors.runtime.read_adapter

    def read(path, name, base, *args, **kwargs):
        weights = real(path, name, base, *args, **kwargs)
        if name == adapter:
            weights.deltas[module].B = weights.deltas[module].B * 1.5
        return weights

    monkeypatch.setattr(actors.runtime, "read_adapter", read)
    with pytest.raises(RuntimeError, match=READ_WRONGLY.format(adapter, module)):
        Predictor(model=model, adapters=store, task="generate", max_new_tokens=2)


# --- refusals ---------------------------------------------------------------------------

def _hand_saved(folder: Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter folder PEFT itself could not produce (it refuses the target): config and
    tensors written directly."""
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS))
    return folder


def _loha_tensors(name: str, d_in: int, d_out: int, r: int = 2) -> dict[str, torch.Tensor]:
    key = f"base_model.model.{name}"
    return {f"{key}.hada_w1_a": torch.ones(d_out, r), f"{key}.hada_w1_b": torch.ones(r, d_in),
            f"{key}.hada_w2_a": torch.ones(d_out, r), f"{key}.hada_w2_b": torch.ones(r, d_in)}


def test_loha_on_gpt2_conv1d_is_refused(gpt2, tmp_path):
    model, _ = gpt2
    tensors = {k: v for n in range(2) for k, v in _loha_tensors(f"transformer.h.{n}.attn.c_attn", 32, 96).items()}
    _hand_saved(tmp_path / "store" / "loha-conv", LoHaConfig(r=2, target_modules=["c_attn"]), tensors)
    with pytest.raises(ValueError, match=r"adapter 'loha-conv': LoHa on module transformer\.h\.0\.attn\.c_attn of "
                                         r"type Conv1D is not supported.*PEFT's LoHa has no layer for GPT-2's Conv1D"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="generate")


def test_loha_and_adalora_on_an_embedding_are_refused(llama, tmp_path):
    model, _ = llama
    vocab, hidden = 400, 64
    emb = "base_model.model.model.embed_tokens"
    _hand_saved(tmp_path / "a" / "loha-emb", LoHaConfig(r=2, target_modules=["embed_tokens"]),
                _loha_tensors("model.embed_tokens", vocab, hidden))
    with pytest.raises(ValueError, match=r"adapter 'loha-emb': LoHa on module model\.embed_tokens of type Embedding"):
        Predictor(model=model, adapters=str(tmp_path / "a"), task="generate")
    ada = {f"{emb}.lora_A": torch.ones(2, vocab), f"{emb}.lora_B": torch.ones(hidden, 2), f"{emb}.lora_E": torch.ones(2, 1)}
    _hand_saved(tmp_path / "b" / "ada-emb", _ada(init_r=2, target_modules=["embed_tokens"]), ada)
    with pytest.raises(ValueError, match=r"adapter 'ada-emb': AdaLoRA on embedding model\.embed_tokens is not "
                                         r"supported \(PEFT's AdaLoRA adapts Linear and Conv1D modules only"):
        Predictor(model=model, adapters=str(tmp_path / "b"), task="generate")


def _broken_copy(store: str, source: str, dest: Path, name: str) -> Path:
    return Path(shutil.copytree(Path(store) / source, dest / name))


def test_adalora_rank_pattern_peft_cannot_load_is_refused(llama_kinds, tmp_path):
    model, store = llama_kinds
    adapter = _broken_copy(store, "ada-pruned", tmp_path / "store", "ada-ints")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] = [1, 0, 1, 0]  # indices, not a mask
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter 'ada-ints': its AdaLoRA rank_pattern entry "
                                         r"'model\.layers\.0\.self_attn\.q_proj\.lora_E' is not a list of init_r=4 "
                                         r"booleans"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="generate")


def test_adalora_weights_that_disagree_with_the_rank_pattern_are_refused(llama_kinds, tmp_path):
    model, store = llama_kinds
    adapter = _broken_copy(store, "ada", tmp_path / "store", "ada-unpruned")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj.lora_E": [True, True, False, False]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter 'ada-unpruned': module model\.layers\.0\.self_attn\.q_proj has "
                                         r"rank 4 but its config says 2"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="generate")


def test_loha_conv_tensors_on_a_linear_are_refused(llama_kinds, tmp_path):
    model, store = llama_kinds
    adapter = _broken_copy(store, "loha", tmp_path / "store", "loha-cp")
    tensors = load_file(str(adapter / WEIGHTS))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.hada_t1"] = torch.ones(4, 4, 1, 1)
    save_file(tensors, str(adapter / WEIGHTS))
    with pytest.raises(ValueError, match=r"adapter 'loha-cp': module model\.layers\.0\.self_attn\.q_proj has LoHa "
                                         r"CP tensors \(hada_t1/hada_t2"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="generate")


def test_unknown_type_is_refused_listing_the_registered_kinds(llama, tmp_path):
    from peft import HRAConfig
    from transformers import AutoModelForCausalLM

    model, _ = llama
    save_adapter(model, tmp_path / "store", "my-hra", HRAConfig(r=2, target_modules=["k_proj", "v_proj"]),
                 model_class=AutoModelForCausalLM)
    registered = ", ".join(KINDS)
    assert registered == "LORA, VERA, ADALORA, LOHA, IA3, LOKR, OFT, BOFT, PROMPT_TUNING, P_TUNING, PREFIX_TUNING"
    with pytest.raises(ValueError, match=rf"adapter 'my-hra' has type HRA; Switchyard routes only {registered} "
                                         r"adapters per row"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="generate")
