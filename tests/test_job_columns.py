"""The job's input columns under other names (`--prompt-column`, `--text-column`,
`--adapter-column`, e.g. Ray Data LLM's `model`) and a sample run of the first rows
(`--limit`): outputs against the oracle, the input column's own name kept in the output, and
one-line refusals."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

import oracle
from pipeline.config import config_from_args
from pipeline.job import run
from testkit.data import SENTENCES
from test_job import _cli


def _write(tmp_path, table: pa.Table) -> str:
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "in.parquet")
    return str(tmp_path / "in.parquet")


@pytest.mark.slow  # a whole job; renames are checked up front in the default run
def test_renamed_columns_and_a_limit(ray_cluster, llama, tmp_path):
    model, store = llama
    n = 7
    table = pa.table({"id": list(range(n)), "question": [SENTENCES[i][: 6 + 5 * i] for i in range(n)],
                      "model": ["lora-qv", None, "vera", "lora-rs", "", "lora-qv", "vera"]})
    config = config_from_args(["--model", model, "--adapters", store, "--task", "generate", "--input",
                               _write(tmp_path, table), "--output", str(tmp_path / "out"), "--prompt-column",
                               "question", "--adapter-column", "model", "--limit", "4", "--max-new-tokens", "3",
                               "--concurrency", "1", "--num-cpus", "0.5"])
    summary = run(config)
    assert summary.rows_in == 4 and summary.rows_out == 4
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert "question" in out.column_names and "prompt" not in out.column_names and "model" not in out.column_names
    rows = sorted(out.to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [0, 1, 2, 3]  # the first rows
    for row, adapter in zip(rows, table.column("model").to_pylist()):
        assert row["adapter_id"] == adapter
        expected = oracle.generate(model, store, adapter or None, row["question"], 3)
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == expected


@pytest.mark.slow  # fan-out through the job: tests/test_job.py, tests/test_resume.py
def test_a_list_column_is_fan_out(ray_cluster, bert, tmp_path):
    model, store = bert
    table = pa.table({"id": [0, 1], "sentence": SENTENCES[:2],
                      "loras": pa.array([["head-a", None], ["head-b"]], pa.list_(pa.string()))})
    config = config_from_args(["--model", model, "--adapters", store, "--task", "classify", "--input",
                               _write(tmp_path, table), "--output", str(tmp_path / "out"), "--text-column",
                               "sentence", "--adapter-column", "loras", "--concurrency", "1", "--num-cpus", "0.5"])
    assert run(config).rows_out == 3
    for row in pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist():
        expected = oracle.scores(model, store, row["adapter_id"], "classify", row["sentence"])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


@pytest.mark.parametrize(("columns", "flags", "message"), [
    ({"question": ["hi"]}, ["--prompt-column", "q"], r"input has no 'q' column \(--prompt-column\)"),
    ({"question": ["hi"], "prompt": ["x"]}, ["--prompt-column", "question"],
     r"input has both 'question' \(--prompt-column\) and 'prompt' columns; drop or rename 'prompt'"),
    ({"prompt": ["hi"], "model": ["a"], "adapter_id": ["b"]}, ["--adapter-column", "model"],
     r"input has both 'model' \(--adapter-column\) and 'adapter_id' columns; keep one of them"),
    ({"prompt": ["hi"]}, ["--text-column", "prompt"],
     r"--text-column is for task classify or embed; task 'generate' reads its 'prompt' column from --prompt-column"),
    ({"prompt": ["hi"]}, ["--limit", "0"], r"--limit \(0\) must be >= 1"),
])
def test_column_and_limit_mistakes_exit_2_with_one_line(llama, tmp_path, columns, flags, message):
    path = _write(tmp_path, pa.table(columns))
    result = _cli("--model", llama[0], "--task", "generate", "--input", path, "--output", str(tmp_path / "out"),
                  *flags, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), result.stderr
