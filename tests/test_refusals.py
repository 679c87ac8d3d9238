"""Everything Switchyard must refuse, up front and with a message naming what is wrong
(docs/contract.md "Correctness", "Security"): adapter types and options it cannot
route, pickle or corrupt weights, adapters for another base, bad store folders, bad
options and bad model folders. Silently wrong output is the defect these guard against."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from peft import BOFTConfig, CartridgeConfig, FourierFTConfig, HRAConfig, LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from actors import Predictor
from testkit.adapters import save_adapter

WEIGHTS = "adapter_model.safetensors"


def _copy(store: str, name: str, dest: Path, new_name: str | None = None) -> Path:
    """Copy adapter `name` of `store` into folder `dest` (created), as `new_name`."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(Path(store) / name, dest / (new_name or name)))


def _edit_config(adapter: Path, **changes) -> None:
    """Overwrite fields of an adapter's adapter_config.json."""
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(adapter: Path, edit) -> None:
    """Rewrite an adapter's safetensors file with `edit(tensors)` applied."""
    tensors = load_file(str(adapter / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(adapter / WEIGHTS))


def _load(model: str, store, task: str = "generate", **options) -> Predictor:
    return Predictor(model=model, adapters=str(store), task=task, **options)


# --- adapter types and options that cannot be routed per row ---------------------------

UNROUTABLE = {  # adapter id -> (config factory, what the message must name)
    "my-hra": (lambda: HRAConfig(r=2, target_modules=["k_proj", "v_proj"]), r"has type HRA"),
    "my-fourierft": (lambda: FourierFTConfig(n_frequency=16, target_modules=["q_proj", "v_proj"]),
                     r"has type FOURIERFT"),
    "my-cartridge": (lambda: CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), r"has type CARTRIDGE"),
    "my-alora": (lambda: LoraConfig(r=4, alora_invocation_tokens=[5, 6], init_lora_weights=False,
                                    target_modules=["q_proj", "v_proj"]), r"uses alora_invocation_tokens=\[5, 6\]"),
    "my-boft2": (lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj"]),
                 r"uses boft_n_butterfly_factor=2; Switchyard routes BOFT with butterfly factor 1 only"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("adapter_id", sorted(UNROUTABLE))
def test_unroutable_adapter_types_are_refused_naming_adapter_and_type(llama, tmp_path, adapter_id):
    model, good_store = llama
    make_config, what = UNROUTABLE[adapter_id]
    store = tmp_path / "store"
    _copy(good_store, "lora-qv", store)  # one bad adapter refuses the store, good ones alongside or not
    save_adapter(model, store, adapter_id, make_config(), model_class=AutoModelForCausalLM, seed=3)
    with pytest.raises(ValueError, match=rf"adapter '{adapter_id}' {what}"):
        _load(model, store)


# (fixture, source adapter, edit of the copy, expected message)
BROKEN = {
    "base-biases": ("llama", "lora-qv", lambda a: _edit_config(a, bias="all"), r"trains base biases \(bias='all'\)"),
    "pissa-init": ("llama", "lora-qv", lambda a: _edit_config(a, init_lora_weights="pissa"),
                   r"initialised with 'pissa', which rewrites the base weights"),
    "rank-mismatch": ("llama", "lora-qv", lambda a: _edit_config(a, r=8),
                      r"module model\.layers\.0\.self_attn\.q_proj has rank 4 but its config says 8"),
    "vera-no-projection": ("llama", "vera", lambda a: _edit_config(a, save_projection=False),
                           r"saved without its VeRA projections"),
    "missing-module": ("llama", "lora-qv", lambda a: _edit_tensors(a, lambda t: [
        t.pop(k) for k in list(t) if ".layers.1.self_attn.v_proj." in k]),
        r"targets model\.layers\.1\.self_attn\.v_proj but adapter_model\.safetensors has no weights"),
    "extra-tensor": ("llama", "lora-qv", lambda a: _edit_tensors(a, lambda t: t.update(
        {"base_model.model.stray": torch.zeros(2)})), r"unexpected tensors in adapter_model\.safetensors"),
    "resized-vocab": ("llama", "lora-emb-head", lambda a: _edit_tensors(a, lambda t: t.update(
        {"base_model.model.model.embed_tokens.base_layer.weight":
         t["base_model.model.model.embed_tokens.base_layer.weight"] + 1})),
        r"carries its own base weights for model\.embed_tokens"),
    "head-shape": ("bert", "head-a", lambda a: _edit_tensors(a, lambda t: t.update(
        {"base_model.model.classifier.weight": torch.zeros(5, 64)})),
        r"head classifier\.weight has shape \(5, 64\), the base model's is \(3, 64\)"),
    "garbage-config": ("llama", "lora-qv", lambda a: (a / "adapter_config.json").write_text("{not json"),
                       r"cannot read adapter_config\.json"),
}
TASK_OF = {"llama": "generate", "bert": "classify"}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_adapters_that_do_not_fit_plain_lora_are_refused(case, tmp_path, request):
    fixture, source, edit, message = BROKEN[case]
    model, good_store = request.getfixturevalue(fixture)
    adapter = _copy(good_store, source, tmp_path / "store", case)
    edit(adapter)
    with pytest.raises(ValueError, match=rf"adapter '{case}'.*{message}"):
        _load(model, tmp_path / "store", TASK_OF[fixture])


# --- weights files ---------------------------------------------------------------------

@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "pytorch_model.bin"])
def test_pickle_adapter_weights_are_refused(llama, tmp_path, pickle_name):
    model, good_store = llama
    adapter = _copy(good_store, "lora-qv", tmp_path / "store", "pickled")
    torch.save(load_file(str(adapter / WEIGHTS)), adapter / pickle_name)
    (adapter / WEIGHTS).unlink()
    with pytest.raises(ValueError, match=rf"adapter 'pickled' has only pickle weights \({pickle_name}\).*"
                                         r"safetensors only"):
        _load(model, tmp_path / "store")


def test_pickle_base_model_weights_are_refused(llama, tmp_path):
    model, _ = llama
    folder = Path(shutil.copytree(model, tmp_path / "model"))
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only"):
        Predictor(model=str(folder), task="generate")


def test_adapter_without_weights_file_is_refused(llama, tmp_path):
    model, good_store = llama
    (_copy(good_store, "lora-qv", tmp_path / "store", "hollow") / WEIGHTS).unlink()
    with pytest.raises(ValueError, match=r"adapter 'hollow' has no adapter_model\.safetensors"):
        _load(model, tmp_path / "store")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_refused(llama, tmp_path, damage):
    model, good_store = llama
    file = _copy(good_store, "lora-qv", tmp_path / "store", "broken") / WEIGHTS
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x13garbage" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"adapter 'broken': corrupt adapter_model\.safetensors"):
        _load(model, tmp_path / "store")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused_as_such(llama, tmp_path, bad):
    model, good_store = llama
    file = _copy(good_store, "lora-qv", tmp_path / "store", "diverged") / WEIGHTS
    tensors = load_file(str(file))
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = bad
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=rf"adapter 'diverged': its weights are not finite \(NaN or inf in {key}\)"):
        _load(model, tmp_path / "store")


# --- adapters trained for another base -------------------------------------------------

def test_adapter_for_another_hidden_size_is_refused_naming_module(llama, tmp_path):
    model, _ = llama
    vocab = AutoModelForCausalLM.from_pretrained(model).config.vocab_size
    small = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    small.save_pretrained(tmp_path / "small")
    save_adapter(tmp_path / "small", tmp_path / "store", "small-hidden",
                 LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                 model_class=AutoModelForCausalLM)
    with pytest.raises(ValueError, match=r"adapter 'small-hidden': weights of module model\.layers\.0\.self_attn\."
                                         r"q_proj \(A \(4, 32\).*do not fit the base module \(in 64, out 64\)"):
        _load(model, tmp_path / "store")


@pytest.mark.parametrize("other", ["gpt2", "bert"])
def test_adapter_for_another_architecture_is_refused(llama, tmp_path, request, other):
    model, _ = llama
    other_store = request.getfixturevalue(other)[1]
    source = {"gpt2": "attn", "bert": "no-head"}[other]
    _copy(other_store, source, tmp_path / "store", f"from-{other}")
    module = {"gpt2": r"transformer\.h\.0\.attn\.c_attn", "bert": r"bert\.encoder\.layer\.0\.attention"}[other]
    with pytest.raises(ValueError, match=rf"adapter 'from-{other}' has weights for module {module}.*which the base "
                                         r"model does not have"):
        _load(model, tmp_path / "store")


# --- the store folder ------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["bad name", "-leading-dash", "x" * 129, "caf\u00e9"])
def test_store_folder_that_is_not_an_adapter_id_is_refused(llama, tmp_path, folder):
    model, good_store = llama
    _copy(good_store, "lora-qv", tmp_path / "store", folder)
    with pytest.raises(ValueError, match=rf"folder name '{folder}' is not a valid adapter id"):
        _load(model, tmp_path / "store")


def test_store_sub_folder_without_adapter_config_is_refused(llama, tmp_path):
    model, good_store = llama
    (_copy(good_store, "lora-qv", tmp_path / "store", "no-config") / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"sub-folder 'no-config' has no adapter_config\.json"):
        _load(model, tmp_path / "store")


def test_store_sub_folder_linking_outside_the_store_is_refused(llama, tmp_path):
    model, good_store = llama
    outside = _copy(good_store, "lora-qv", tmp_path / "elsewhere")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"sub-folder 'linked' links outside the store"):
        _load(model, tmp_path / "store")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_unreadable_store_is_refused(llama, tmp_path, kind):
    store = tmp_path / "store"
    if kind == "file":
        store.write_text("not a folder")
    with pytest.raises(ValueError, match=r"adapter store .* is not a readable folder"):
        _load(llama[0], store)


def test_hidden_folders_and_stray_files_in_the_store_are_ignored(llama, tmp_path):
    model, good_store = llama
    store = tmp_path / "store"
    _copy(good_store, "lora-qv", store)
    (store / ".cache").mkdir()
    (store / "README.md").write_text("notes")
    assert _load(model, store, max_new_tokens=1).adapter_ids == ["lora-qv"]


def test_load_adapter_after_start_refuses_bad_ids_and_types(llama, tmp_path):
    model, good_store = llama
    store = tmp_path / "store"
    predictor = _load(model, _copy(good_store, "lora-qv", store).parent, max_new_tokens=1)
    for bad in ("../lora-qv", "a/b", "", "missing"):
        with pytest.raises(KeyError):
            predictor.load_adapter(bad)
    save_adapter(model, store, "late-hra", UNROUTABLE["my-hra"][0](), model_class=AutoModelForCausalLM)
    with pytest.raises(ValueError, match=r"adapter 'late-hra' has type HRA"):
        predictor.load_adapter("late-hra")
    assert predictor.adapter_ids == ["lora-qv"]


# --- the base model folder and remote code ---------------------------------------------

def test_model_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(ValueError, match=r"model folder .* has no readable config\.json"):
            Predictor(model=str(folder), task="generate")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"has no readable config\.json"):
        Predictor(model=str(tmp_path / "garbled"), task="generate")


def test_model_folder_without_weights_or_for_another_task_is_refused(llama, vit, tmp_path):
    (tmp_path / "bare").mkdir()
    shutil.copy(Path(llama[0]) / "config.json", tmp_path / "bare")
    with pytest.raises(ValueError, match=r"model folder .*bare.* has no \*\.safetensors weights"):
        Predictor(model=str(tmp_path / "bare"), task="generate")
    with pytest.raises(ValueError, match=r"cannot load model folder .* as AutoModelForCausalLM for task 'generate'"):
        Predictor(model=vit[0], task="generate")


def _with_remote_code(model: str, dest: Path, model_type: str) -> Path:
    """A copy of `model` whose config (and tokenizer) point at local code that leaves a marker."""
    folder = Path(shutil.copytree(model, dest))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    marker = dest.parent / "remote-code-ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    return folder


def test_remote_code_is_never_executed(llama, tmp_path):
    known = _with_remote_code(llama[0], tmp_path / "known", "llama")
    predictor = Predictor(model=str(known), task="generate", max_new_tokens=1)  # built-in Llama code only
    assert type(predictor.task.model).__module__.startswith("transformers.models.llama")
    custom = _with_remote_code(llama[0], tmp_path / "custom", "evil-remote")
    with pytest.raises(ValueError, match=r"cannot load model folder .*custom code"):
        Predictor(model=str(custom), task="generate")
    assert not (tmp_path / "remote-code-ran").exists()


# --- Predictor options -----------------------------------------------------------------

BAD_OPTIONS = [
    ("task", "translate", r"task \('translate'\) must be one of generate, classify, embed, classify-image"),
    ("dtype", "float64", r"dtype \('float64'\) must be one of"),
    ("device", "tpu", r"device \('tpu'\) must be auto, cpu, cuda or cuda:N"),
    ("max_new_tokens", 0, r"max_new_tokens \(0\) must be an integer >= 1"),
    ("max_new_tokens", "8", r"max_new_tokens \('8'\) must be an integer >= 1"),
    ("temperature", -1.0, r"temperature \(-1\.0\) must be a finite number >= 0"),
    ("temperature", float("inf"), r"temperature \(inf\) must be a finite number >= 0"),
    ("top_p", 0, r"top_p \(0\) must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p \(1\.5\) must be in \(0, 1\]"),
    ("max_loaded_adapters", 0, r"max_loaded_adapters \(0\) must be >= 1"),
    ("max_batch_rows", 0, r"max_batch_rows \(0\) must be >= 1"),
    ("stop", ["ok", ""], r"stop \(\['ok', ''\]\) must be non-empty strings"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD_OPTIONS, ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS])
def test_bad_options_are_refused_naming_the_field(llama, option, value, message):
    with pytest.raises(ValueError, match=message):
        Predictor(model=llama[0], **{"task": "generate", option: value})


def test_unknown_option_is_refused(llama):
    with pytest.raises(TypeError, match="max_tokens"):
        Predictor(model=llama[0], task="generate", max_tokens=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_refused(llama):
    with pytest.raises(ValueError, match=r"device \('cuda'\) asked for but no CUDA GPU is visible"):
        Predictor(model=llama[0], task="generate", device="cuda")


# --- malformed batches (the only errors a call raises) ---------------------------------

def test_malformed_batches_raise_naming_the_problem(bert):
    predictor = Predictor(model=bert[0], adapters=bert[1], task="classify")
    with pytest.raises(ValueError, match=r"batch has no 'text' column, which task 'classify' reads"):
        predictor(pa.table({"prompt": ["hi"]}))
    with pytest.raises(ValueError, match=r"batch has both 'adapter_id' and 'adapter_ids'"):
        predictor(pa.table({"text": ["hi"], "adapter_id": ["head-a"], "adapter_ids": [["head-a"]]}))
    with pytest.raises(ValueError, match=r"'adapter_ids' must hold lists of adapter ids, but row 1 holds the string "
                                         r"'head-a'"):
        predictor(pd.DataFrame({"text": ["hi", "yo"], "adapter_ids": [["head-a"], "head-a"]}))
    with pytest.raises(ValueError, match=r"batch columns have different lengths: \[1, 2\]"):
        predictor({"text": np.array(["a", "b"]), "adapter_id": np.array(["head-a"])})
    with pytest.raises(ValueError, match=r"batch must be a pyarrow Table, a pandas DataFrame or a dict"):
        predictor([{"text": "hi"}])


def test_seed_must_fit_a_torch_generator(llama):
    from actors.config import PredictorConfig

    with pytest.raises(ValueError, match=r"seed \(1180591620717411303424\) must be an integer in \[0, 2\*\*63\)"):
        PredictorConfig(model=llama[0], seed=2**70)
