"""Non-leaf heads (RoBERTa, XLM-R and Electra: `classifier` = `dense` + `out_proj`) against the
oracle, with adapters that copy the head, adapters with LoRA inside the base head, and both
in one store, read in either order.

What PEFT 0.21 does, and these tests pin:
- `modules_to_save=["classifier"]` saves the copy under the module's own keys
  (`base_model.model.classifier.dense.weight`, ..., `modules_to_save.default` stripped).
- LoRA targets inside an adapter's own `modules_to_save` module are excluded from target
  matching (`check_target_module_exists`): `target_modules=["classifier.dense"]` together with
  `modules_to_save=["classifier"]` gives no LoRA there; the copy is used as saved. A file that
  still carries such LoRA weights is loaded by PEFT without them, silently: Switchyard refuses it.
- `task_type="SEQ_CLS"` (or TOKEN_CLS) adds `classifier` and `score` to `modules_to_save`
  before target matching (and saves them in the config), QUESTION_ANS adds `qa_outputs`.
- LoRA on `classifier.dense` / `classifier.out_proj` without `modules_to_save` adapts the base
  head itself.
"""

from __future__ import annotations

import functools
import json
import shutil

import pyarrow as pa
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, ElectraConfig, ElectraForSequenceClassification
from transformers import RobertaConfig, RobertaForSequenceClassification

import oracle
from actors import Predictor
from testkit.adapters import save_adapter
from testkit.data import SENTENCES
from testkit.models import MAX_POSITIONS, _label_kwargs, _save, bert_tokenizer

# (role, config) per adapter; each store names them so that sorted order differs (see STORES).
ADAPTERS = {
    "copy": dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "plain": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "inner": dict(r=4, lora_alpha=8, target_modules=["classifier.dense", "classifier.out_proj"]),
    "inner-bias": dict(r=8, lora_alpha=4, target_modules=["value", "classifier.dense"], lora_bias=True),
    "copy-target": dict(r=4, lora_alpha=8, target_modules=["query", "classifier.dense"],
                        modules_to_save=["classifier"]),
    "leaf-copy": dict(r=2, lora_alpha=4, target_modules=["key"], modules_to_save=["classifier.out_proj"]),
    # PEFT's sequence-classification class adds `classifier` and `score` to modules_to_save itself
    "seq-cls": dict(r=4, lora_alpha=8, target_modules=["query", "classifier.dense"], task_type="SEQ_CLS"),
}
# Adapter ids per store: "ab" reads them in the order above, "rev" in the reverse one (head
# copies after the LoRA inside the head).
STORES = {
    "ab": {role: f"{chr(ord('a') + k)}-{role}" for k, role in enumerate(ADAPTERS)},
    "rev": {role: f"{chr(ord('z') - k)}-{role}" for k, role in enumerate(ADAPTERS)},
}


def build_roberta(path) -> str:
    """A tiny RobertaForSequenceClassification (3 labels) with a WordPiece tokenizer."""
    tokenizer = bert_tokenizer()
    pad = tokenizer.pad_token_id
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=MAX_POSITIONS + pad + 1,
                           pad_token_id=pad, initializer_range=0.2, dtype="float32", **_label_kwargs(3))
    torch.manual_seed(0)
    return _save(RobertaForSequenceClassification(config), path, [tokenizer])


def build_electra(path) -> str:
    """A tiny ElectraForSequenceClassification (embedding projection, gelu head), 3 labels."""
    tokenizer = bert_tokenizer()
    config = ElectraConfig(vocab_size=len(tokenizer), embedding_size=32, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, max_position_embeddings=MAX_POSITIONS,
                           pad_token_id=tokenizer.pad_token_id, initializer_range=0.2, dtype="float32",
                           **_label_kwargs(3))
    torch.manual_seed(0)
    return _save(ElectraForSequenceClassification(config), path, [tokenizer])


BUILDERS = {"roberta": build_roberta, "electra": build_electra}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (model dir, {store name: store dir}); each store holds every adapter of ADAPTERS."""
    out = {}
    for arch, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(arch)
        model = build(root / "model")
        stores = {}
        for store, ids in STORES.items():
            for seed, (role, kw) in enumerate(ADAPTERS.items(), start=1):
                save_adapter(model, root / store, ids[role], LoraConfig(init_lora_weights=False, **kw),
                             model_class=AutoModelForSequenceClassification, seed=seed)
            stores[store] = str(root / store)
        out[arch] = (model, stores)
    return out


@functools.lru_cache(maxsize=8)
def _predictor(model: str, store: str) -> Predictor:
    return Predictor(model=model, adapters=store, task="classify")


def _check_mixed(p: Predictor, model: str, store: str, adapters: list) -> None:
    """One mixed batch of ragged texts: every row equals PEFT alone for its adapter."""
    texts = [SENTENCES[i % len(SENTENCES)][: 8 + 7 * (i % 5)] for i in range(len(adapters))]
    out = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    assert len(out) == len(adapters)
    for row in out:
        assert row["error"] is None, row
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
        oracle.assert_close(row["scores"], expected, what=f"{store} {row['adapter_id']}")


@pytest.mark.parametrize("store", sorted(STORES))
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_mixed_batch_with_head_copies_and_lora_inside_the_head(models, arch, store):
    model, stores = models[arch]
    p = _predictor(model, stores[store])
    ids = list(STORES[store].values())
    assert sorted(p.adapter_ids) == sorted(ids)
    adapters = [*ids, None, *reversed(ids), "", ids[2], ids[0]]
    _check_mixed(p, model, stores[store], adapters)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_each_role_alone_and_in_pairs(models, arch):
    """Uniform batches (the single-adapter fast paths) and every pair of a head copy with LoRA
    inside the head."""
    model, stores = models[arch]
    ids = STORES["rev"]
    p = _predictor(model, stores["rev"])
    for role in ADAPTERS:
        _check_mixed(p, model, stores["rev"], [ids[role]] * 3)
    for copy_role in ("copy", "copy-target", "leaf-copy"):
        for inner_role in ("inner", "inner-bias"):
            _check_mixed(p, model, stores["rev"], [ids[copy_role], ids[inner_role], ids[inner_role], ids[copy_role]])


def test_peft_saves_head_copies_under_the_modules_own_keys(models):
    model, stores = models["roberta"]
    ids = STORES["ab"]
    copy_keys = sorted(k for k in load_file(f"{stores['ab']}/{ids['copy-target']}/adapter_model.safetensors")
                       if "classifier" in k)
    assert copy_keys == [f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj")
                         for p in ("bias", "weight")]  # and no LoRA inside the copy, though targeted
    inner_keys = sorted(k for k in load_file(f"{stores['ab']}/{ids['inner']}/adapter_model.safetensors"))
    assert inner_keys == [f"base_model.model.classifier.{m}.lora_{x}.weight" for m in ("dense", "out_proj")
                          for x in ("A", "B")]


def test_head_copies_hold_no_routed_layers_of_other_adapters(models):
    from actors.layers import LowRankLinear, RoutedHead

    model, stores = models["roberta"]
    p = _predictor(model, stores["rev"])
    head = p.runtime.heads["classifier"]
    assert head.copies and isinstance(head.base_layer.dense, LowRankLinear)
    assert isinstance(head.base_layer.out_proj, RoutedHead)  # the leaf copy, outermost, around the LoRA
    for copy in head.copies.values():
        assert not any(isinstance(m, (LowRankLinear, RoutedHead)) for m in copy.modules())


def test_lora_weights_inside_the_adapters_own_head_are_refused(models, tmp_path):
    model, stores = models["roberta"]
    source = f"{stores['ab']}/{STORES['ab']['copy-target']}"
    store = tmp_path / "store"
    shutil.copytree(source, store / "bad-head")
    file = store / "bad-head" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.classifier.dense.lora_A.weight"] = torch.randn(4, 64)
    tensors["base_model.model.classifier.dense.lora_B.weight"] = torch.randn(64, 4)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=r"adapter 'bad-head' has LORA weights for classifier\.dense, inside its own "
                                         r"modules_to_save module 'classifier'.*would be ignored"):
        Predictor(model=model, adapters=str(store), task="classify")


def _copy_adapter(stores, role, store, name, config_edit=None, tensor_edit=None) -> None:
    """Copy adapter `role` of store "ab" to `store/name`, editing its config and tensors."""
    shutil.copytree(f"{stores['ab']}/{STORES['ab'][role]}", store / name)
    config_file, tensor_file = store / name / "adapter_config.json", store / name / "adapter_model.safetensors"
    if config_edit:
        config_file.write_text(json.dumps(config_edit(json.loads(config_file.read_text()))))
    if tensor_edit:
        tensors = load_file(str(tensor_file))
        tensor_edit(tensors)
        save_file(tensors, str(tensor_file))


def _add_inner_lora(tensors: dict) -> None:
    tensors["base_model.model.classifier.dense.lora_A.weight"] = torch.randn(4, 64)
    tensors["base_model.model.classifier.dense.lora_B.weight"] = torch.randn(64, 4)


def test_lora_inside_a_task_type_head_is_refused(models, tmp_path):
    """A SEQ_CLS config that does not list `classifier` itself, with a copy of it and LoRA on
    classifier.dense: PEFT still treats `classifier` as modules_to_save (measured: it loads
    the copy and silently drops that LoRA)."""
    model, stores = models["roberta"]
    _copy_adapter(stores, "seq-cls", tmp_path / "store", "seq-cls-inner",
                  lambda c: {**c, "modules_to_save": None}, _add_inner_lora)
    with pytest.raises(ValueError, match=r"adapter 'seq-cls-inner' has LORA weights for classifier\.dense, inside "
                                         r"its own modules_to_save module 'classifier' \(its config's, or its "
                                         r"task_type's\).*Remove them from adapter_model\.safetensors"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="classify")


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_a_modules_to_save_module_without_its_copy_is_refused(models, tmp_path, task_type):
    """PEFT cannot load these (KeyError on the missing copy); serving the base head instead
    would answer for an adapter PEFT refuses."""
    model, stores = models["roberta"]
    edit = (lambda c: {**c, "modules_to_save": ["classifier"]}) if task_type is None else \
        (lambda c: {**c, "task_type": "SEQ_CLS"})
    _copy_adapter(stores, "plain", tmp_path / "store", "no-copy", edit)
    with pytest.raises(ValueError, match=r"adapter 'no-copy': its modules_to_save .* names module classifier, but "
                                         r"adapter_model\.safetensors has no copy of it, so PEFT cannot load it"):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="classify")


def test_peft_saves_the_task_type_heads_in_the_config(models):
    model, stores = models["roberta"]
    folder = f"{stores['ab']}/{STORES['ab']['seq-cls']}"
    assert json.loads(open(f"{folder}/adapter_config.json").read())["modules_to_save"] == ["classifier", "score"]
    assert not any("classifier" in k and "lora" in k for k in load_file(f"{folder}/adapter_model.safetensors"))


def test_roberta_context_is_its_positions_less_those_before_the_pad_id(models):
    """RoBERTa numbers tokens from pad_token_id + 1: its max_position_embeddings of
    MAX_POSITIONS + pad + 1 holds MAX_POSITIONS tokens. A row of that many is answered (as
    PEFT answers it), one token more is too_long (not an index error inside the model)."""
    from transformers import AutoTokenizer

    model, stores = models["roberta"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = {n: " ".join(["the"] * (n - 2)) for n in (MAX_POSITIONS, MAX_POSITIONS + 1)}
    assert {n: len(tokenizer(t)["input_ids"]) for n, t in texts.items()} == {n: n for n in texts}
    adapter = STORES["ab"]["plain"]
    out = _predictor(model, stores["ab"])(pa.table({"text": list(texts.values()),
                                                    "adapter_id": [adapter] * 2})).to_pylist()
    assert out[0]["error"] is None, out[0]
    oracle.assert_close(out[0]["scores"], oracle.scores(model, stores["ab"], adapter, "classify", texts[MAX_POSITIONS]))
    assert out[1]["error"] == f"too_long: {MAX_POSITIONS + 1} input tokens exceed the model's context of {MAX_POSITIONS}"
