"""Adapter-aware blocks in the batch job: with more adapters than slots, rows are sorted by
adapter before the actors (fan-out rows expanded first). The output is the same rows as
without (each equal to PEFT alone), and each output file holds its rows in adapter order."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import oracle
from pipeline import cluster
from pipeline.config import config_from_args
from pipeline.job import run
from testkit.data import SENTENCES

ADAPTERS = ["lora-qv", "vera", "lora-rs", "lora-pattern", "lora-layers", "lora-emb-head", "lora-regex-bias"]


def _run(tmp_path, name, model, store, table, *extra) -> list[pa.Table]:
    """Run the job; its output files, each as a table."""
    pq.write_table(table, tmp_path / f"{name}.parquet")
    run(config_from_args(["--model", model, "--adapters", store, "--task", "generate", "--input",
                          str(tmp_path / f"{name}.parquet"), "--output", str(tmp_path / name), "--num-cpus", "0.5",
                          "--batch-size", "4", "--rows-per-block", "8", "--max-new-tokens", "3",
                          "--max-loaded-adapters", "2", *extra]))
    return [f.to_table() for f in pads.dataset(str(tmp_path / name), format="parquet").get_fragments()]


def test_rows_sorted_by_adapter_equal_peft(ray_cluster, llama, tmp_path, caplog):
    """Scalar rows over 7 adapters and the base with 2 slots per actor, sorted (the job says
    so): every row equals PEFT alone, and each output file's rows come in adapter order
    (unsorted, the rows cycle through the adapters)."""
    model, store = llama
    n = 24
    adapters = [([*ADAPTERS, None][(5 * i) % 8]) for i in range(n)]
    prompts = [SENTENCES[i % 9][: 5 + 2 * (i % 6)] for i in range(n)]
    table = pa.table({"id": list(range(n)), "prompt": prompts, "adapter_id": adapters})
    with caplog.at_level(logging.INFO, logger="pipeline.job"):
        files = _run(tmp_path, "sorted", model, store, table, "--cluster-by-adapter", "on")
    assert "sorting rows by adapter before the actors (7 adapters, 2 slots per actor" in caplog.text
    rows = [r for f in files for r in f.to_pylist()]
    assert sorted((r["id"], r["adapter_id"] or "") for r in rows) == sorted((i, a or "") for i, a in enumerate(adapters))
    for row in rows:
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], 3)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
    for f in files:
        keys = [a or "" for a in f.column("adapter_id").to_pylist()]
        assert keys == sorted(keys), keys
    assert len(files) > 1 and len({a or "" for f in files for a in f.column("adapter_id").to_pylist()}) == 8


@pytest.mark.slow  # the expansion itself: test_expand_matches_the_predictors_fan_out
def test_fan_out_rows_are_expanded_before_sorting(ray_cluster, llama, tmp_path):
    """`adapter_ids` lists (base entries as null or "", an empty list or null for the base
    alone): one output row per named adapter, as the actors expand them, each equal to PEFT."""
    model, store = llama
    cells = [["vera", "lora-qv", None], [], ["lora-rs", ""], ["lora-qv"], None, ["lora-pattern", "vera"]]
    table = pa.table({"id": list(range(len(cells))), "prompt": [SENTENCES[i][:12] for i in range(len(cells))],
                      "adapter_ids": pa.array(cells, pa.list_(pa.string()))})
    files = _run(tmp_path, "sorted", model, store, table, "--cluster-by-adapter", "on")
    rows = [r for f in files for r in f.to_pylist()]
    named = [(i, a or "") for i, cell in enumerate(cells) for a in (cell or [None])]
    assert sorted((r["id"], r["adapter_id"] or "") for r in rows) == sorted(named)
    for row in rows:
        expected = oracle.generate(model, store, row["adapter_id"], row["prompt"], 3)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected, row
    assert all("adapter_ids" not in f.column_names and cluster.KEY not in f.column_names for f in files)


@pytest.mark.parametrize("mode, adapters, slots, columns, rows, gpus, expected", [
    ("auto", 7, 2, ["adapter_id"], 112, 1, True),  # 16 rows per adapter, GPU actors
    ("auto", 7, 2, ["adapter_id"], 112, 0, False),  # CPU actors: sorting did not pay on the bench
    ("auto", 7, 2, ["adapter_id"], 111, 1, False),  # fewer rows: the sort is not won back
    ("auto", 7, None, ["adapter_id"], 10**6, 1, False),  # every adapter has a slot
    ("auto", 7, 7, ["adapter_ids"], 10**6, 0.5, False),
    ("auto", 7, 2, ["prompt"], 10**6, 1, False),  # no adapter column: every row is the base model's
    ("on", 1, None, ["adapter_ids"], 1, 0, True),
    ("off", 700, 2, ["adapter_id"], 10**6, 1, False),
])
def test_when_the_job_sorts(mode, adapters, slots, columns, rows, gpus, expected):
    schema = pa.schema([pa.field(c, pa.string()) for c in columns])
    assert cluster.wanted(mode, adapters, slots, schema, rows, gpus) is expected


def test_expand_matches_the_predictors_fan_out():
    batch = pa.table({"id": [0, 1, 2], "adapter_ids": pa.array([["a", "", None], None, ["b"]], pa.list_(pa.string()))})
    out = cluster.expand(batch)
    assert out.column("id").to_pylist() == [0, 0, 0, 1, 2]
    assert out.column("adapter_id").to_pylist() == ["a", None, None, None, "b"]
    assert out.column(cluster.KEY).to_pylist() == ["a", "", "", "", "b"]
    with pytest.raises(ValueError, match="'adapter_ids' must hold lists of adapter ids, but a row holds the string"):
        cluster.expand(pa.table({"adapter_ids": ["a"]}))


def test_a_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--cluster-by-adapter \('sometimes'\) must be auto, on or off"):
        config_from_args(["--model", "m", "--task", "generate", "--input", "i", "--output", "o",
                          "--cluster-by-adapter", "sometimes"])
