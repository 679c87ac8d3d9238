"""classify and classify-image scores follow transformers' classification pipelines: the
logits for problem_type regression, sigmoid for multi-label or a single logit, softmax
otherwise; label_id is the argmax of the scores and label its id2label name. The reference
is PEFT alone per row (plain transformers for base rows) with the function applied here,
and the text-classification pipeline itself for base rows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import oracle
from actors import Predictor
from testkit.adapters import save_adapter
from testkit.data import SENTENCES, png_bytes

IDENTITY, SIGMOID, SOFTMAX = (lambda x: x), torch.sigmoid, (lambda x: torch.softmax(x, -1))
# case: (problem_type, num_labels, the function the pipeline applies)
CASES = {
    "regression": ("regression", 1, IDENTITY),
    "multi-label": ("multi_label_classification", 3, SIGMOID),
    "single-logit": (None, 1, SIGMOID),
    "single-label": ("single_label_classification", 3, SOFTMAX),
    "default": (None, 3, SOFTMAX),
}


def _set_problem_type(model_dir: str, problem_type: str | None) -> None:
    """Write problem_type into a saved model's config.json."""
    path = Path(model_dir) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "problem_type": problem_type}))


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(init_lora_weights=False, **kw)


def _build(root: Path, builder, model_class, problem_type, num_labels, head_modules) -> tuple[str, str]:
    """(model dir, store dir): a tiny model with `problem_type`, one adapter with its own head, one without."""
    model = builder(root / "model", num_labels=num_labels)
    _set_problem_type(model, problem_type)
    store = root / "store"
    save_adapter(model, store, "head", _lora(r=4, lora_alpha=8, target_modules=head_modules,
                                             modules_to_save=["classifier"]), model_class=model_class, seed=1)
    save_adapter(model, store, "no-head", _lora(r=4, lora_alpha=8, target_modules=head_modules),
                 model_class=model_class, seed=2)
    return model, str(store)


@pytest.fixture(scope="module", params=sorted(CASES))
def text_case(request, tmp_path_factory):
    """(case name, model dir, store dir) of a BERT classifier per problem_type case."""
    from transformers import AutoModelForSequenceClassification

    from testkit.models import build_bert

    problem_type, num_labels, _ = CASES[request.param]
    root = tmp_path_factory.mktemp(f"scores-{request.param}")
    return (request.param, *_build(root, build_bert, AutoModelForSequenceClassification, problem_type, num_labels,
                                   ["query", "value"]))


def _check_row(row: dict, logits: torch.Tensor, function, id2label: dict) -> None:
    """scores = function(logits), label_id = their argmax, label = its name."""
    expected = function(logits)
    oracle.assert_close(row["scores"], expected.tolist(), what=str(row["adapter_id"]))
    assert row["label_id"] == int(expected.argmax())
    assert row["label"] == id2label[row["label_id"]]


def test_text_scores_follow_problem_type(text_case):
    name, model, store = text_case
    _, num_labels, function = CASES[name]
    p = Predictor(model=model, adapters=store, task="classify", canary=False)
    adapters = ["head", None, "no-head", "", "head", "no-head", None]
    texts = [SENTENCES[i][: 8 + 9 * (i % 4)] for i in range(len(adapters))]
    out = p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist()
    id2label = oracle.oracle_model(model, store, None, "classify").config.id2label
    for row in out:
        assert row["error"] is None and len(row["scores"]) == num_labels
        _check_row(row, oracle.logits(model, store, row["adapter_id"], "classify", row["text"]), function, id2label)
    if name == "regression":  # the scores are the raw logits, not a softmax over one logit (always 1.0)
        assert len({round(r["scores"][0], 4) for r in out}) > 1


def test_text_scores_equal_the_pipeline(text_case):
    from transformers import pipeline

    name, model, store = text_case
    p = Predictor(model=model, task="classify", canary=False)
    texts = [SENTENCES[i][: 10 + 7 * i] for i in range(3)]
    out = p(pa.table({"text": texts})).to_pylist()
    classifier = pipeline("text-classification", model=oracle.oracle_model(model, None, None, "classify"),
                          tokenizer=oracle.processor(model, "classify"))
    for row, every, top in zip(out, classifier(texts, top_k=None), classifier(texts)):
        by_label = {d["label"]: d["score"] for d in every}
        labels = oracle.oracle_model(model, None, None, "classify").config.id2label
        oracle.assert_close(row["scores"], [by_label[labels[i]] for i in range(len(labels))], what=name)
        assert row["label"] == top["label"]


def test_image_scores_follow_problem_type(tmp_path):
    from transformers import AutoModelForImageClassification

    from testkit.models import build_vit

    model, store = _build(tmp_path, build_vit, AutoModelForImageClassification, "multi_label_classification", 3,
                          ["q_proj", "v_proj"])
    p = Predictor(model=model, adapters=store, task="classify-image", canary=False)
    images = [png_bytes(i, (40, 28)) for i in range(4)]
    out = p(pa.table({"image": images, "adapter_id": ["head", None, "no-head", "head"], "k": [0, 1, 2, 3]}))
    id2label = oracle.oracle_model(model, store, None, "classify-image").config.id2label
    for row in out.to_pylist():
        logits = oracle.logits(model, store, row["adapter_id"], "classify-image", images[row["k"]])
        _check_row(row, logits, SIGMOID, id2label)


# --- per-adapter label names ------------------------------------------------------------

def _copy_adapter(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_an_adapter_with_its_own_label_names_uses_them(bert, tmp_path):
    """A config.json with id2label beside an adapter (`model.config.save_pretrained(dir)`
    after training on other labels) names that adapter's labels; the others keep the base's."""
    model, store = bert
    own = {"0": "spam", "1": "ham", "2": "eggs"}
    shop = tmp_path / "store"
    _copy_adapter(Path(store) / "head-a", shop / "relabelled")
    (shop / "relabelled" / "config.json").write_text(json.dumps({"id2label": own, "model_type": "bert"}))
    _copy_adapter(Path(store) / "head-b", shop / "head-b")
    p = Predictor(model=model, adapters=str(shop), task="classify")
    base_names = json.loads((Path(model) / "config.json").read_text())["id2label"]
    texts = [SENTENCES[i][: 10 + 7 * i] for i in range(6)]
    adapters = ["relabelled", "head-b", None, "relabelled", "head-b", None]
    for row in p(pa.table({"text": texts, "adapter_id": adapters})).to_pylist():
        scores = oracle.scores(model, str(shop), row["adapter_id"], "classify", row["text"])
        top = max(range(len(scores)), key=scores.__getitem__)
        names = own if row["adapter_id"] == "relabelled" else base_names
        assert (row["label_id"], row["label"]) == (top, names[str(top)]), row


@pytest.mark.parametrize(("id2label", "message"), [
    ({"0": "a", "1": "b"}, r"adapter 'two-labels': its config.json names 2 labels, the base model has 3; a classify "
                           r"adapter keeps the base's number of labels"),
    ({"0": "a", "2": "c", "3": "d"}, r"adapter 'two-labels': id2label in its config.json must map every class id "
                                     r"0..n-1 to a name"),
])
def test_label_names_that_do_not_fit_are_refused(bert, tmp_path, id2label, message):
    model, store = bert
    adapter = _copy_adapter(Path(store) / "head-a", tmp_path / "store" / "two-labels")
    (adapter / "config.json").write_text(json.dumps({"id2label": id2label}))
    with pytest.raises(ValueError, match=message):
        Predictor(model=model, adapters=str(tmp_path / "store"), task="classify")
    from actors.validation import validate_store

    with pytest.raises(ValueError, match=message):  # the job's driver check says the same
        validate_store(model, str(tmp_path / "store"), "classify")


@pytest.mark.parametrize("task", ["classify", "classify-image"])
def test_scores_logits_gives_the_raw_logits(bert, vit, task):
    """`scores="logits"` (`--scores logits`): the head's raw logits, label_id their argmax."""
    model, store = bert if task == "classify" else vit
    column = "text" if task == "classify" else "image"
    values = SENTENCES[:3] if task == "classify" else [png_bytes(seed=s) for s in range(3)]
    p = Predictor(model=model, adapters=store, task=task, scores="logits")
    cycle = [None, *sorted(p.adapter_ids)]
    adapters = [cycle[k % len(cycle)] for k in range(len(values))]
    for row, value in zip(p(pa.table({column: values, "adapter_id": adapters})).to_pylist(), values):
        expected = oracle.logits(model, store, row["adapter_id"], task, value)
        oracle.assert_close(row["scores"], expected.tolist(), what=str(row["adapter_id"]))
        assert row["label_id"] == int(expected.argmax())
    with pytest.raises(ValueError, match=r"scores \('probabilities'\) must be one of auto, logits"):
        Predictor(model=model, task=task, scores="probabilities")


@pytest.mark.parametrize("fmt", ["pyarrow", "pandas", "numpy"])
def test_an_input_with_no_pass_through_column(vit, fmt):
    """Only `image` (dropped from the output) and `adapter_id` (rewritten): the output is the
    task's columns alone, one row per input row."""
    import numpy as np

    model, store = vit
    p = Predictor(model=model, adapters=store, task="classify-image", canary=False)
    images, adapters = [png_bytes(seed=s) for s in range(3)], [None, p.adapter_ids[0], None]
    batch = pa.table({"image": images, "adapter_id": adapters})
    if fmt == "pandas":
        batch = batch.to_pandas()
    elif fmt == "numpy":
        batch = {"image": np.array(images, dtype=object), "adapter_id": np.array(adapters, dtype=object)}
    out = p(batch)
    rows = out.to_pylist() if fmt == "pyarrow" else (out.to_dict("records") if fmt == "pandas" else
                                                     [dict(zip(out, v)) for v in zip(*out.values())])
    missing = lambda v: v is None or v != v  # noqa: E731 - pandas holds a null string as NaN
    assert len(rows) == 3 and all(missing(r["error"]) for r in rows)
    assert [None if missing(r["adapter_id"]) else r["adapter_id"] for r in rows] == adapters
