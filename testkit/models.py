"""Builders of tiny, deterministic, offline-loadable Hugging Face model folders."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MobileViTConfig,
    MobileViTForImageClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
)

from testkit.data import SENTENCES

try:  # transformers >= 5.x: the PIL backends work without torchvision and save the same config.
    from transformers import MobileViTImageProcessorPil as MobileViTProcessor
    from transformers import ViTImageProcessorPil as ViTProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import MobileViTImageProcessor as MobileViTProcessor
    from transformers import ViTImageProcessor as ViTProcessor

MAX_POSITIONS = 128
BPE_VOCAB_SIZE = 400
WORDPIECE_VOCAB_SIZE = 400
WORDPIECE_SUFFIXES = ("##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##ion", "##ful", "##ness")
LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
GPT2_EOS = "<|endoftext|>"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _labels(num_labels: int) -> dict[int, str]:
    """Return id2label: sentiment names for 3 labels, generic names otherwise."""
    if num_labels == 3:
        return {0: "negative", 1: "neutral", 2: "positive"}
    return {i: f"LABEL_{i}" for i in range(num_labels)}


def _label_kwargs(num_labels: int) -> dict[str, object]:
    """Return the config keyword arguments that describe ``num_labels`` classes."""
    id2label = _labels(num_labels)
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _seed(seed: int) -> None:
    """Seed every RNG torch model construction may draw from."""
    torch.manual_seed(seed)


def _train_byte_bpe(specials: tuple[str, ...]) -> Tokenizer:
    """Train a byte-level BPE tokenizer in memory on SENTENCES."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Build a Llama-like byte-level BPE tokenizer that prepends ``<s>``."""
    tok = _train_byte_bpe(LLAMA_SPECIALS)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """Build a GPT-2 style byte-level BPE tokenizer (eos = pad = ``<|endoftext|>``)."""
    tok = _train_byte_bpe((GPT2_EOS,))
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return GPT2TokenizerFast(
        vocab=tok.get_vocab(),
        merges=merges,
        pad_token=GPT2_EOS,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
    )


def _wordpiece_vocab() -> dict[str, int]:
    """Return a deterministic WordPiece vocab: specials, chars, ## chars, suffixes, corpus words."""
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for sentence in SENTENCES:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)))
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces = [*BERT_SPECIALS, *chars, *("##" + c for c in chars), *WORDPIECE_SUFFIXES, *words]
    vocab: dict[str, int] = {}
    for piece in pieces[:WORDPIECE_VOCAB_SIZE]:
        vocab.setdefault(piece, len(vocab))
    return vocab


def bert_tokenizer() -> BertTokenizerFast:
    """Build a BertTokenizerFast ([CLS] ... [SEP]) from an in-memory WordPiece vocab."""
    return BertTokenizerFast(vocab=_wordpiece_vocab(), do_lower_case=True, model_max_length=MAX_POSITIONS)


def _quiet_tokens(model: PreTrainedModel, token_ids: list[int]) -> None:
    """Shrink the output-embedding rows of special tokens so greedy decoding rarely picks them."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[token_ids] = head[token_ids] * 0.25


def make_readable(folder: str | Path) -> None:
    """Give saved safetensors files mode 0644 (safetensors 0.8 writes them 0600, ignoring umask)."""
    for file in Path(folder).glob("*.safetensors"):
        file.chmod(0o644)


def _save(model: PreTrainedModel, path: str | Path, extras: list[Any]) -> str:
    """Save a model (safetensors) and its tokenizer/processor/generation config into ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    for extra in extras:
        extra.save_pretrained(out)
    make_readable(out)
    return str(out)


def build_llama(path: str | Path, *, seed: int = 0, num_labels: int | None = None) -> str:
    """Build a tiny LlamaForCausalLM (+ tokenizer, generation config) into ``path``; with
    ``num_labels``, a LlamaForSequenceClassification (its saved `score` head included, so
    every load of the folder has the same head)."""
    tokenizer = llama_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    labels = _label_kwargs(num_labels) if num_labels else {}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.1, tie_word_embeddings=False, dtype="float32", **ids, **labels,
    )
    _seed(seed)
    if num_labels:
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
        _quiet_tokens(model, sorted({ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]}))
    return _save(model, path, [tokenizer, GenerationConfig(**ids)])


def build_gpt2(path: str | Path, *, seed: int = 0) -> str:
    """Build a tiny GPT2LMHeadModel (+ tokenizer, generation config) into ``path``."""
    tokenizer = gpt2_tokenizer()
    eos = tokenizer.eos_token_id
    ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
        initializer_range=0.1, dtype="float32", **ids,
    )
    _seed(seed)
    model = GPT2LMHeadModel(config)
    return _save(model, path, [tokenizer, GenerationConfig(**ids)])


def build_bert(path: str | Path, *, seed: int = 0, num_labels: int = 3) -> str:
    """Build a tiny BertForSequenceClassification (+ WordPiece tokenizer) into ``path``."""
    tokenizer = bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.2, pad_token_id=tokenizer.pad_token_id, dtype="float32",
        **_label_kwargs(num_labels),
    )
    _seed(seed)
    model = BertForSequenceClassification(config)
    return _save(model, path, [tokenizer])


def build_vit(path: str | Path, *, seed: int = 0, num_labels: int = 3) -> str:
    """Build a tiny ViTForImageClassification (+ ViT image processor, 32x32) into ``path``."""
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, initializer_range=0.05, dtype="float32", **_label_kwargs(num_labels),
    )
    processor = ViTProcessor(size={"height": 32, "width": 32})
    _seed(seed)
    model = ViTForImageClassification(config)
    return _save(model, path, [processor])


def _mobilevit_config(num_labels: int) -> MobileViTConfig:
    """Return the smallest sensible MobileViT config (64x64 input)."""
    return MobileViTConfig(
        image_size=64, patch_size=2, hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=4, expand_ratio=2.0,
        mlp_ratio=2.0, hidden_dropout_prob=0.0, classifier_dropout_prob=0.0,
        dtype="float32", **_label_kwargs(num_labels),
    )


def _reinit_convnet(model: torch.nn.Module) -> None:
    """Give convs Kaiming weights and BatchNorms unit scale (HF init leaves BN weights ~0.02)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.bias.normal_(0.0, 0.1)
                module.reset_running_stats()
                module.momentum = None


def _calibrate_batchnorm(model: torch.nn.Module, size: int, batches: int = 4) -> None:
    """Estimate BatchNorm running stats from random images (train mode, no grad)."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(pixel_values=torch.rand(8, 3, size, size))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1
    model.eval()


def build_mobilevit(path: str | Path, *, seed: int = 0, num_labels: int = 3) -> str:
    """Build a tiny calibrated MobileViTForImageClassification (+ processor) into ``path``."""
    config = _mobilevit_config(num_labels)
    processor = MobileViTProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    )
    _seed(seed)
    model = MobileViTForImageClassification(config)
    _reinit_convnet(model)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
    _calibrate_batchnorm(model, config.image_size)
    return _save(model, path, [processor])
