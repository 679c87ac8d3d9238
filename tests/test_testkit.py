"""Tests of testkit: tiny offline HF model folders, seeded PEFT adapters and sample data."""

from __future__ import annotations

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import (  # noqa: E402
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    PromptTuningConfig,
    VeraConfig,
)
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import (  # noqa: E402
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from testkit.adapters import save_adapter  # noqa: E402
from testkit.data import SENTENCES, jpeg_bytes, png_bytes  # noqa: E402
from testkit.models import build_bert, build_gpt2, build_llama, build_mobilevit, build_vit  # noqa: E402

PROMPTS = SENTENCES[:4]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Build every tiny model once per module."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_llama(root / "llama"),
        "gpt2": build_gpt2(root / "gpt2"),
        "bert": build_bert(root / "bert"),
        "vit": build_vit(root / "vit"),
        "mobilevit": build_mobilevit(root / "mobilevit"),
    }


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Return the names of the nn.Linear submodules."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _images(n: int) -> list[Image.Image]:
    """Return ``n`` seeded random PIL images."""
    return [Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(n)]


def _folder_bytes(path: str) -> dict[str, bytes]:
    """Return every file's bytes in a folder, keyed by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


def test_data_images_decode_and_are_deterministic() -> None:
    """PNG/JPEG helpers give decodable, seed-determined images."""
    assert png_bytes(3) == png_bytes(3) != png_bytes(4)
    assert Image.open(io.BytesIO(png_bytes(0, (20, 10)))).size == (20, 10)
    assert Image.open(io.BytesIO(jpeg_bytes(1, (32, 32)))).format == "JPEG"
    assert len(SENTENCES) >= 25 and len(set(SENTENCES)) == len(SENTENCES)


@pytest.mark.parametrize("builder", [build_llama, build_gpt2, build_bert, build_vit, build_mobilevit])
def test_builds_are_deterministic(builder, tmp_path: Path) -> None:
    """Two builds with the same seed are byte-identical; another seed changes the weights."""
    a, b = builder(tmp_path / "a", seed=5), builder(tmp_path / "b", seed=5)
    c = builder(tmp_path / "c", seed=6)
    assert _folder_bytes(a) == _folder_bytes(b)
    assert _folder_bytes(a)["model.safetensors"] != _folder_bytes(c)["model.safetensors"]


def test_llama_tokenizer_and_generation(built: dict[str, str]) -> None:
    """Llama folder loads offline; tokenizer adds BOS and round-trips; greedy output varies."""
    path = built["llama"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    gen = GenerationConfig.from_pretrained(path)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert model.config.vocab_size == len(tok)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 3)
    for text in SENTENCES + ["Unseen wörds & émojis 🙂 123"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    new = out[:, batch.input_ids.shape[1]:]
    assert new.shape == (len(PROMPTS), 20)
    assert (new == tok.eos_token_id).float().mean() < 0.5
    assert all(len(set(row.tolist())) >= 4 for row in new)
    assert len({tuple(row.tolist()) for row in new}) == len(PROMPTS)


def test_llama_with_labels_loads_for_classification(tmp_path: Path) -> None:
    """build_llama(num_labels=...) gives a folder usable for sequence classification, whose
    saved head makes every load the same model."""
    path = build_llama(tmp_path / "llama_cls", num_labels=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    again = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.id2label[2] == "positive"
    with torch.no_grad():
        logits = model(**tok(PROMPTS, return_tensors="pt", padding=True)).logits
        assert torch.equal(logits, again(**tok(PROMPTS, return_tensors="pt", padding=True)).logits)
    assert logits.shape == (len(PROMPTS), 3)


def test_gpt2_loads_and_generates(built: dict[str, str]) -> None:
    """GPT-2 folder loads offline, uses Conv1D layers, and round-trips text."""
    path = built["gpt2"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == model.config.eos_token_id
    assert tok.pad_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    text = SENTENCES[7]
    assert tok.decode(tok(text).input_ids) == text
    conv = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert "transformer.h.0.attn.c_attn" in conv and "transformer.h.1.mlp.c_fc" in conv
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert out.shape == (len(PROMPTS), batch.input_ids.shape[1] + 10)


def test_bert_classifier_and_embeddings(built: dict[str, str]) -> None:
    """BERT folder loads as a classifier and as a bare encoder; inputs give distinct outputs."""
    path = built["bert"]
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert enc.input_ids[0, 0] == tok.cls_token_id and tok.sep_token_id in enc.input_ids[0].tolist()
    assert {tok.pad_token, tok.unk_token, tok.mask_token} == {"[PAD]", "[UNK]", "[MASK]"}
    assert tok.unk_token_id not in tok("Hello, world! 42?").input_ids
    clf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert clf.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    bare = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        logits = clf(**enc).logits
        hidden = bare(**enc).last_hidden_state
    assert logits.shape == (len(PROMPTS), 3)
    assert hidden.shape[:2] == enc.input_ids.shape and hidden.shape[2] == 64
    assert logits.std(dim=0).mean() > 0.05


def test_vit_loads_with_image_processor(built: dict[str, str]) -> None:
    """ViT folder loads with AutoImageProcessor; attention uses q_proj/k_proj/v_proj."""
    path = built["vit"]
    proc = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    pixels = proc(_images(4), return_tensors="pt").pixel_values
    assert pixels.shape == (4, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert logits.shape == (4, 3) and logits.std(dim=0).mean() > 0.01
    assert "vit.layers.0.attention.q_proj" in _linear_names(model)


def test_mobilevit_gives_input_dependent_logits(built: dict[str, str]) -> None:
    """Calibrated MobileViT gives clearly different logits for different images."""
    path = built["mobilevit"]
    proc = AutoImageProcessor.from_pretrained(path)
    model = AutoModelForImageClassification.from_pretrained(path).eval()
    pixels = proc(_images(6), return_tensors="pt").pixel_values
    assert pixels.shape == (6, 3, 64, 64)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert torch.isfinite(logits).all()
    assert torch.cdist(logits, logits).fill_diagonal_(float("inf")).min() > 0.05
    assert logits.std(dim=0).mean() > 0.1
    names = _linear_names(model)
    assert "mobilevit.encoder.layer.2.transformer.layer.0.attention.attention.query" in names


def _llama_logits(model: torch.nn.Module, path: str) -> torch.Tensor:
    """Return the model's logits on the fixed prompts."""
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return model(**tok(PROMPTS, return_tensors="pt", padding=True)).logits


def _reload_and_compare(model_dir: str, adapter_dir: str, model_class) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (base logits, adapted logits) on sample inputs for a saved adapter."""
    base = model_class.from_pretrained(model_dir).eval()
    if model_class is AutoModelForImageClassification:
        inputs = AutoImageProcessor.from_pretrained(model_dir)(_images(4), return_tensors="pt")
    else:
        inputs = AutoTokenizer.from_pretrained(model_dir)(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = base(**inputs).logits
        adapted = PeftModel.from_pretrained(model_class.from_pretrained(model_dir), adapter_dir).eval()
        after = adapted(**inputs).logits
    return before, after


def test_lora_adapter_changes_outputs(built: dict[str, str], tmp_path: Path) -> None:
    """A saved LoRA adapter reloads with PeftModel and changes the logits."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    path = save_adapter(built["llama"], tmp_path, "lora", config, model_class=AutoModelForCausalLM, seed=1)
    assert Path(path, "adapter_model.safetensors").exists()
    before, after = _reload_and_compare(built["llama"], path, AutoModelForCausalLM)
    assert torch.isfinite(after).all()
    assert 0.05 < float((after - before).norm() / before.norm()) < 3.0


def test_vera_adapter_saves_projections_and_changes_outputs(built: dict[str, str], tmp_path: Path) -> None:
    """A VeRA adapter over differently shaped layers saves its projections and changes outputs."""
    config = VeraConfig(r=16, target_modules=["q_proj", "up_proj", "down_proj"], save_projection=True)
    path = save_adapter(built["llama"], tmp_path, "vera", config, model_class=AutoModelForCausalLM, seed=2)
    with safe_open(str(Path(path, "adapter_model.safetensors")), "pt") as f:
        keys = set(f.keys())
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    before, after = _reload_and_compare(built["llama"], path, AutoModelForCausalLM)
    assert torch.isfinite(after).all()
    assert 0.05 < float((after - before).norm() / before.norm()) < 3.0


def test_adapters_are_deterministic(built: dict[str, str], tmp_path: Path) -> None:
    """Same seed gives byte-identical adapter files; another seed gives other weights."""
    config = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    kw = {"model_class": AutoModelForCausalLM}
    a = save_adapter(built["llama"], tmp_path, "a", config, seed=3, **kw)
    b = save_adapter(built["llama"], tmp_path, "b", config, seed=3, **kw)
    c = save_adapter(built["llama"], tmp_path, "c", config, seed=4, **kw)
    fa, fb, fc = _folder_bytes(a), _folder_bytes(b), _folder_bytes(c)
    assert fa["adapter_model.safetensors"] == fb["adapter_model.safetensors"]
    assert fa["adapter_config.json"] == fb["adapter_config.json"]
    assert fa["adapter_model.safetensors"] != fc["adapter_model.safetensors"]


ADAPTER_CASES: dict[str, tuple[str, object, PeftConfig]] = {
    "lora_rslora_patterns": ("llama", AutoModelForCausalLM, LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32})),
    "lora_bias": ("llama", AutoModelForCausalLM, LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)),
    "lora_layers": ("llama", AutoModelForCausalLM, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "lora_regex": ("llama", AutoModelForCausalLM, LoraConfig(
        r=4, target_modules=r".*\.layers\.0\.(self_attn\.(q|v)_proj|mlp\.up_proj)")),
    "lora_embed_head": ("llama", AutoModelForCausalLM, LoraConfig(
        r=4, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "lora_modules_to_save": ("llama", AutoModelForCausalLM, LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "gpt2_lora_conv1d": ("gpt2", AutoModelForCausalLM, LoraConfig(
        r=4, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)),
    "ia3": ("llama", AutoModelForCausalLM, IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "loha": ("llama", AutoModelForCausalLM, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "lokr": ("llama", AutoModelForCausalLM, LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "oft": ("llama", AutoModelForCausalLM, OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])),
    "dora": ("llama", AutoModelForCausalLM, LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"])),
    "boft": ("llama", AutoModelForCausalLM, BOFTConfig(boft_block_size=8, target_modules=["q_proj", "v_proj"])),
    "bert_lora_seq_cls": ("bert", AutoModelForSequenceClassification, LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"])),
    "vit_lora_head": ("vit", AutoModelForImageClassification, LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    "vit_vera_head": ("vit", AutoModelForImageClassification, VeraConfig(
        r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    "mobilevit_lora_head": ("mobilevit", AutoModelForImageClassification, LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter_kinds_reload_and_change_outputs(case: str, built: dict[str, str], tmp_path: Path) -> None:
    """Every supported adapter kind saves, reloads and visibly changes finite outputs."""
    arch, model_class, config = ADAPTER_CASES[case]
    path = save_adapter(built[arch], tmp_path, case, config, model_class=model_class, seed=7)
    before, after = _reload_and_compare(built[arch], path, model_class)
    assert torch.isfinite(after).all()
    assert 0.05 < float((after - before).norm() / before.norm()) < 3.0


def test_prompt_tuning_adapter_saves(built: dict[str, str], tmp_path: Path) -> None:
    """A prompt-tuning adapter saves and reloads (used by refusal tests)."""
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    path = save_adapter(built["llama"], tmp_path, "prompt", config, model_class=AutoModelForCausalLM)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(built["llama"]), path)
    assert model.peft_config["default"].peft_type.value == "PROMPT_TUNING"
    logits = _llama_logits(model.eval(), built["llama"])
    assert torch.isfinite(logits).all()
