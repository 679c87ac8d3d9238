"""Property-based batch compositions (hypothesis): whatever shares a batch (base rows as
None and "", fan-out rows with duplicates, unknown ids, ragged lengths, any batch format,
batches split by size or adapter capacity), every output row equals the oracle for its
input row and adapter, and the row count is sum(max(1, adapters named))."""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from actors import Predictor
from testkit.data import SENTENCES

PROFILE = {"deadline": None, "derandomize": True, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
UNKNOWN = ["nope", "../head-a", "a/b", "HEAD-A"]
TEXT_IDS = {"classify": ["head-a", "head-b", "no-head", "vera"], "embed": ["emb-a", "emb-b"]}
FORMATS = ["pyarrow", "pandas", "pandas-nullable", "numpy"]
LAYOUTS = {"roomy": {}, "tight": {"max_batch_rows": 3, "max_loaded_adapters": 2}}


@functools.lru_cache(maxsize=None)
def _predictor(model: str, store: str, task: str, layout: str, **options) -> Predictor:
    return Predictor(model=model, adapters=store, task=task, **LAYOUTS[layout], **options)


@functools.lru_cache(maxsize=None)
def _expected(model: str, store: str, task: str, adapter: str | None, value: str, n_new: int = 0) -> tuple:
    """The oracle's output for one row, cached per (adapter, input)."""
    if task == "generate":
        return oracle.generate(model, store, adapter, value, n_new)
    if task == "embed":
        return tuple(oracle.embedding(model, store, adapter, value))
    return tuple(oracle.scores(model, store, adapter, task, value))


# --- strategies ------------------------------------------------------------------------

def _texts(max_len: int = 90):
    """Sentence prefixes and concatenations of ragged lengths (so rows get padded), and a
    few empty or null inputs."""
    sentence = st.builds(lambda i, n: SENTENCES[i][:n], st.integers(0, len(SENTENCES) - 1), st.integers(1, 45))
    joined = st.lists(sentence, min_size=1, max_size=3).map(lambda parts: " ".join(parts)[:max_len])
    return st.one_of(joined, joined, joined, st.sampled_from([None, ""]))


def _adapter(ids: list[str]):
    return st.sampled_from([None, "", *ids, *ids, *UNKNOWN])


@st.composite
def batches(draw, ids: list[str], max_rows: int, texts=None):
    """(table, expansions): a pyarrow batch of 0..max_rows rows and, per row, the adapters it names."""
    n = draw(st.integers(0, max_rows))
    values = draw(st.lists(texts or _texts(), min_size=n, max_size=n))
    if draw(st.booleans()):
        adapters = draw(st.lists(_adapter(ids), min_size=n, max_size=n))
        column = {"adapter_id": pa.array(adapters, pa.string())}
        expansions = [[a] for a in adapters]
    else:
        lists = st.one_of(st.none(), st.lists(_adapter(ids), max_size=3))
        named = draw(st.lists(lists, min_size=n, max_size=n))
        column = {"adapter_ids": pa.array(named, pa.list_(pa.string()))}
        expansions = [[None if x == "" else x for x in (a or [])] or [None] for a in named]  # base rows: null
    return pa.table({"value": pa.array(values, pa.string()), **column, "k": pa.array(range(n), pa.int64())}), expansions


def _format(table: pa.Table, fmt: str, column: str):
    table = table.rename_columns([column if c == "value" else c for c in table.column_names])
    if fmt.startswith("pandas"):  # pandas-nullable: Int64/string dtypes whose nulls are pd.NA
        return table.to_pandas().convert_dtypes() if fmt == "pandas-nullable" else table.to_pandas()
    if fmt == "numpy":
        return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    return table


def _records(out, fmt: str) -> list[dict]:
    if fmt == "pyarrow":
        return out.to_pylist()
    if fmt.startswith("pandas"):
        return pa.Table.from_pandas(out, preserve_index=False).to_pylist()
    plain = {c: [v.tolist() if isinstance(v, np.ndarray) else v for v in a.tolist()] for c, a in out.items()}
    return [dict(zip(plain, row)) for row in zip(*plain.values())]


# --- the invariant ---------------------------------------------------------------------

def _check(out: list[dict], table: pa.Table, expansions: list, known: set, expected) -> None:
    """Row counts, one output row per (input row, named adapter), each the oracle's."""
    values = table.column("value").to_pylist()
    assert len(out) == sum(max(1, len(e)) for e in expansions)
    key = lambda a: "\0null" if a is None else a  # noqa: E731 - sort None apart from ""
    assert sorted((r["k"], key(r["adapter_id"])) for r in out) == \
        sorted((k, key(a)) for k, e in enumerate(expansions) for a in e)
    for row in out:
        adapter, value = row["adapter_id"], values[row["k"]]
        if adapter and adapter not in known:
            assert row["error"].startswith("unknown_adapter:"), row
        elif not value:
            assert row["error"].startswith("empty_input:"), row
        else:
            assert row["error"] is None, row
            expected(row, adapter or None, value)
        if row["error"] is not None:
            assert all(row[c] is None for c in row if c not in ("k", "adapter_id", "error", "value", "text",
                                                                 "prompt")), row


@pytest.mark.parametrize("task", ["classify", "embed"])
@settings(max_examples=40, **PROFILE)
@given(data=st.data())
def test_text_batches_equal_the_oracle_row_by_row(request, task, data):
    model, store = request.getfixturevalue("bert" if task == "classify" else "bert_embed")
    layout, fmt = data.draw(st.sampled_from(sorted(LAYOUTS))), data.draw(st.sampled_from(FORMATS))
    table, expansions = data.draw(batches(TEXT_IDS[task], 10))
    predictor = _predictor(model, store, task, layout)
    out = _records(predictor(_format(table, fmt, "text")), fmt)
    column = "scores" if task == "classify" else "embedding"

    def expected(row, adapter, value):
        oracle.assert_close(row[column], _expected(model, store, task, adapter, value), what=f"{adapter} {value!r}")

    _check(out, table, expansions, set(TEXT_IDS[task]), expected)


GEN_IDS = ["lora-qv", "lora-emb-head", "vera", "lora-regex-bias"]


@settings(max_examples=8, **PROFILE)
@given(data=st.data())
def test_generate_batches_equal_the_oracle_row_by_row(llama, data):
    model, store = llama
    table, expansions = data.draw(batches(GEN_IDS, 5, _texts(40)))
    n_new = data.draw(st.integers(2, 3))
    predictor = _predictor(model, store, "generate", "roomy", max_new_tokens=n_new)
    out = predictor(_format(table, "pyarrow", "prompt")).to_pylist()

    def expected(row, adapter, value):
        text, count, reason = _expected(model, store, "generate", adapter, value, n_new)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == (text, count, reason)
        assert row["num_input_tokens"] == len(oracle.processor(model, "generate")(value)["input_ids"])

    _check(out, table, expansions, set(GEN_IDS), expected)

