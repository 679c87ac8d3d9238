"""A model folder without the task's head (a BERT saved as AutoModel, run with --task
classify): transformers initialises the missing weights randomly, which would make every row
silently wrong. The Predictor refuses it, unless every adapter carries its own copy of those
modules; then adapter rows are exact and base rows are refused."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from peft import LoraConfig

import oracle
from actors import Predictor
from testkit.adapters import save_adapter
from testkit.data import SENTENCES

RANDOM_HEAD = (r"the model folder '.*' has no trained weights for classifier.bias, classifier.weight: "
               r"AutoModelForSequenceClassification initialises them randomly, so rows would be silently wrong")


@pytest.fixture(scope="module")
def headless(bert, tmp_path_factory):
    """(model dir, store dir): the session's BERT saved as a bare encoder (no classifier), and
    a store of two SEQ_CLS LoRA adapters, each saving its own classifier."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("headless")
    AutoModel.from_pretrained(bert[0]).save_pretrained(root / "model")
    oracle.processor(bert[0], "classify").save_pretrained(root / "model")
    model = str(root / "model")
    for seed, name in enumerate(("head-1", "head-2"), start=1):
        save_adapter(model, root / "store", name, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"],
                                                             init_lora_weights=False),
                     model_class=AutoModelForSequenceClassification, seed=seed)
    return model, str(root / "store")


def test_a_folder_without_the_task_head_is_refused(headless):
    model, _ = headless
    with pytest.raises(ValueError, match=RANDOM_HEAD + r"\. Use the folder saved for task 'classify'"):
        Predictor(model=model, task="classify")


def test_adapters_with_their_own_heads_run_and_base_rows_are_refused(headless):
    model, store = headless
    p = Predictor(model=model, adapters=store, task="classify")
    texts = [SENTENCES[i][: 8 + 9 * i] for i in range(5)]
    rows = p(pa.table({"text": texts, "adapter_id": ["head-1", None, "head-2", "", "head-1"]})).to_pylist()
    for row in rows:
        if row["adapter_id"]:
            assert row["error"] is None
            expected = oracle.scores(model, store, row["adapter_id"], "classify", row["text"])
            oracle.assert_close(row["scores"], expected, what=row["adapter_id"])
        else:
            assert row["error"] == ("unknown_adapter: base rows would run the randomly initialised classifier.bias, "
                                    "classifier.weight (the model folder has no trained weights for them); name one "
                                    "of the store's adapters, each of which carries its own")
            assert row["scores"] is None


def test_an_adapter_without_its_own_head_is_refused(headless, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, store = headless
    mixed = tmp_path / "store"
    for name in ("head-1", "head-2"):
        (mixed / name).mkdir(parents=True)
        for f in (Path(store) / name).iterdir():
            (mixed / name / f.name).write_bytes(f.read_bytes())
    save_adapter(model, mixed, "no-head", LoraConfig(r=4, target_modules=["value"], init_lora_weights=False),
                 model_class=AutoModelForSequenceClassification)
    with pytest.raises(ValueError, match=RANDOM_HEAD + r"; adapter\(s\) 'no-head' carry no copy of their own"):
        Predictor(model=model, adapters=str(mixed), task="classify")
    (mixed / "no-head").rename(tmp_path / "later")
    p = Predictor(model=model, adapters=str(mixed), task="classify")
    (tmp_path / "later").rename(mixed / "no-head")
    with pytest.raises(ValueError, match=RANDOM_HEAD + r"; adapter\(s\) 'no-head' carry no copy"):
        p.load_adapter("no-head")
    assert not p.knows("no-head")
    row = p(pa.table({"text": ["hello"], "adapter_id": ["no-head"]})).to_pylist()[0]
    assert row["error"].startswith("unknown_adapter:")


@pytest.mark.slow  # a whole job; the refusal itself is tested on the Predictor above
def test_the_job_reports_the_refusal_in_one_line(ray_cluster, headless, tmp_path):
    from test_job import _job

    model, _ = headless
    (tmp_path / "empty-store").mkdir()
    with pytest.raises(ValueError, match=r"the actors refused to start: " + RANDOM_HEAD):
        _job(tmp_path, model, str(tmp_path / "empty-store"), "classify", pa.table({"text": ["hello", "there"]}))
