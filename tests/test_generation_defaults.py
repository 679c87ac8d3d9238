"""Which fields of the model's generation_config.json apply (README, "Choices where the spec
is silent"): its repetition_penalty on every row and its top_k on sampled rows, as
transformers' `generate` fills fields a call leaves unset; Switchyard's temperature (0:
greedy), top_p and max_new_tokens always win. Checked in mixed batches against an
independent oracle: `generate` on each row alone, from a model folder without those
defaults, with every parameter passed explicitly."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

import oracle
from actors import Predictor
from testkit.data import SENTENCES

INSTRUCT = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.3}
PENALTY, TOP_K = INSTRUCT["repetition_penalty"], INSTRUCT["top_k"]
ADAPTERS = ["lora-rs", None, "vera", "lora-qv", None, "lora-emb-head"]
PROMPTS = [SENTENCES[i][: 4 + 6 * i] for i in range(len(ADAPTERS))]  # ragged: rows are left-padded


def _with_generation_config(model: str, dest: Path, **fields) -> str:
    """A copy of `model` whose generation_config.json also sets `fields`."""
    folder = Path(shutil.copytree(model, dest))
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return str(folder)


@pytest.fixture(scope="module")
def instruct(llama, tmp_path_factory) -> str:
    """The test Llama with an instruct-style generation_config.json."""
    return _with_generation_config(llama[0], tmp_path_factory.mktemp("instruct") / "model", **INSTRUCT)


def _run(model: str, store: str, temperatures: list | None = None, **options) -> list[dict]:
    columns = {"prompt": PROMPTS, "adapter_id": ADAPTERS}
    if temperatures is not None:
        columns["temperature"] = pa.array(temperatures, type=pa.float64())
    predictor = Predictor(model=model, adapters=store, task="generate", **options)
    return predictor(pa.table(columns)).to_pylist()


def _outcome(row: dict) -> tuple:
    return row["generated_text"], row["num_generated_tokens"], row["finish_reason"]


def test_greedy_rows_get_the_models_repetition_penalty_and_never_sample(llama, instruct):
    plain, store = llama
    rows = _run(instruct, store, max_new_tokens=10)  # no temperature: greedy, whatever do_sample says
    changed = 0
    for row, adapter, prompt in zip(rows, ADAPTERS, PROMPTS):
        expected = oracle.generate(plain, store, adapter, prompt, 10, repetition_penalty=PENALTY)
        assert _outcome(row) == expected, (adapter, prompt)
        changed += expected != oracle.generate(plain, store, adapter, prompt, 10)
    assert changed, "the penalty changed no row: the test would not see it missing"


def test_sampled_rows_get_the_models_top_k_and_the_jobs_top_p(llama, instruct):
    plain, store = llama
    temperatures = [None, 0.0, 1.2, None, 0.0, 0.5]  # None: the job's 0.8; 0: greedy rows in the same batch
    rows = _run(instruct, store, temperatures, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=7)
    without_top_k = 0
    for row, adapter, prompt, t in zip(rows, ADAPTERS, PROMPTS, temperatures):
        t = 0.8 if t is None else t
        expected = oracle.generate(plain, store, adapter, prompt, 8, temperature=t, top_p=0.95, seed=7, top_k=TOP_K,
                                   repetition_penalty=PENALTY)
        assert _outcome(row) == expected, (adapter, prompt, t)
        if t > 0:
            without_top_k += expected != oracle.generate(plain, store, adapter, prompt, 8, temperature=t, top_p=0.95,
                                                         seed=7, repetition_penalty=PENALTY)
    assert without_top_k, "top_k changed no sampled row: the test would not see it missing"


def test_other_decoding_fields_are_named_in_a_warning_and_not_applied(llama, instruct, tmp_path, caplog):
    extra = _with_generation_config(instruct, tmp_path / "extra", no_repeat_ngram_size=2, min_p=0.2)
    with caplog.at_level(logging.WARNING, logger="actors.tasks.generate"):
        rows = _run(extra, llama[1], max_new_tokens=10, canary=False)
    warning = " ".join(r.getMessage() for r in caplog.records if r.name == "actors.tasks.generate")
    assert "min_p=0.2" in warning and "no_repeat_ngram_size=2" in warning, warning
    for key in INSTRUCT:
        assert f"{key}=" not in warning
    assert [_outcome(r) for r in rows] == [_outcome(r) for r in _run(instruct, llama[1], max_new_tokens=10)]


@pytest.mark.parametrize("field, value, message", [
    ("repetition_penalty", -1.0, r"repetition_penalty -1\.0; it must be a number > 0"),
    ("top_k", 2.5, r"top_k 2\.5; it must be an integer >= 0"),
])
def test_a_bad_penalty_or_top_k_in_the_file_is_refused(llama, tmp_path, field, value, message):
    model = _with_generation_config(llama[0], tmp_path / "bad", **{field: value})
    with pytest.raises(ValueError, match=message):
        Predictor(model=model, task="generate", canary=False)
