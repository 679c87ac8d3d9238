"""The batch job end to end on a real local Ray: Parquet in, Parquet out, against the oracle."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import oracle
from pipeline.config import config_from_args
from pipeline.job import run
from testkit.data import SENTENCES, jpeg_bytes, png_bytes

ROOT = Path(__file__).resolve().parent.parent


def _read(output) -> list[dict]:
    """The job's output rows, sorted by input id then adapter (write order is not kept)."""
    rows = pads.dataset(str(output), format="parquet").to_table().to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r["adapter_id"] or ""))


def _job(tmp_path, model, store, task, table, *extra) -> list[dict]:
    """Write `table`, run the job in this process on the session's Ray, read the output."""
    pq.write_table(table, tmp_path / "in.parquet")
    config = config_from_args(["--model", model, "--adapters", store, "--task", task, "--input",
                               str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                               "--concurrency", "2", "--num-cpus", "0.5", "--batch-size", "5", *extra])
    summary = run(config)
    assert summary.rows_in == table.num_rows
    return _read(tmp_path / "out")


def test_generate_job_equals_oracle_with_errors_and_pass_through(ray_cluster, llama, tmp_path):
    model, store = llama
    adapters = ["lora-qv", None, "vera", "", "lora-rs", "nope", "lora-emb-head", "vera", None, "lora-qv", "lora-layers",
                "lora-regex-bias"]
    prompts = [SENTENCES[i][: 6 + 4 * i] for i in range(len(adapters))]
    prompts[3], prompts[8] = "", "word " * 200  # empty_input, too_long
    table = pa.table({
        "id": list(range(len(adapters))), "prompt": prompts, "adapter_id": adapters,
        "score": [i / 3 for i in range(len(adapters))],
        "tags": pa.array([[i, i + 1] for i in range(len(adapters))], type=pa.list_(pa.int32())),
        "max_new_tokens": pa.array([3 if i % 4 == 0 else 0 if i == 10 else None for i in range(len(adapters))],
                                   type=pa.int64()),  # row 10: bad_parameter
    })
    rows = _job(tmp_path, model, store, "generate", table, "--max-new-tokens", "4")
    assert len(rows) == len(adapters)
    expected_errors = {3: "empty_input:", 5: "unknown_adapter:", 8: "too_long:", 10: "bad_parameter:"}
    for row in rows:
        i = row["id"]
        assert row["adapter_id"] == adapters[i] and row["prompt"] == prompts[i]  # pass-through unchanged
        assert row["score"] == i / 3 and row["tags"] == [i, i + 1]
        if i in expected_errors:
            assert row["error"].startswith(expected_errors[i])
            assert row["generated_text"] is None and row["num_input_tokens"] is None
            continue
        limit = 3 if i % 4 == 0 else 4
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == \
            oracle.generate(model, store, adapters[i], prompts[i], limit)
        assert row["num_input_tokens"] == len(oracle.processor(model, "generate")(prompts[i])["input_ids"])
    out_schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert out_schema.field("tags").type == pa.list_(pa.int32())


@pytest.mark.slow  # the checkpointed fan-out run of tests/test_resume.py checks the same rows
def test_fan_out_job_row_counts_and_oracle(ray_cluster, bert, tmp_path):
    model, store = bert
    named = [["head-a", "no-head"], [], None, ["vera"], ["head-b", "head-a", "head-a"], ["missing", "vera"]]
    texts = [SENTENCES[i] for i in range(len(named))]
    table = pa.table({"id": list(range(len(named))), "text": texts,
                      "adapter_ids": pa.array(named, type=pa.list_(pa.string()))})
    rows = _job(tmp_path, model, store, "classify", table)
    assert len(rows) == sum(max(1, len(n or [])) for n in named)
    for row in rows:
        if row["adapter_id"] == "missing":
            assert row["error"].startswith("unknown_adapter:") and row["scores"] is None
            continue
        assert row["adapter_id"] in (named[row["id"]] or [None])
        expected = oracle.scores(model, store, row["adapter_id"], "classify", texts[row["id"]])
        oracle.assert_close(row["scores"], expected, what=str(row))
    assert "adapter_ids" not in rows[0]


@pytest.mark.slow  # images: tests/test_serve.py and the Predictor tests
def test_image_job_equals_oracle_with_bad_images(ray_cluster, vit, tmp_path):
    model, store = vit
    images = [png_bytes(1), jpeg_bytes(2, (48, 20)), b"\x89PNG not really", None, png_bytes(5), png_bytes(6)]
    adapters = ["vit-a", "vit-b", "vit-a", "vit-b", None, "vit-a"]
    table = pa.table({"id": list(range(6)), "image": pa.array(images, type=pa.binary()), "adapter_id": adapters})
    rows = _job(tmp_path, model, store, "classify-image", table)
    assert len(rows) == 6 and "image" not in rows[0]
    assert rows[2]["error"].startswith("bad_image:") and rows[2]["scores"] is None
    assert rows[3]["error"].startswith("empty_input:") and rows[3]["label"] is None
    for row in (r for r in rows if r["id"] not in (2, 3)):
        expected = oracle.scores(model, store, row["adapter_id"], "classify-image", images[row["id"]])
        oracle.assert_close(row["scores"], expected, what=str(row["adapter_id"]))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python jobs/batch_infer.py ARGS` as a user would."""
    return subprocess.run([sys.executable, "jobs/batch_infer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture
def job_input(tmp_path):
    """A valid small input file."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [0, 1], "prompt": ["hello", "the cat"], "adapter_id": ["lora-qv", None]}), path)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing_input", "cannot read input"),
    ("garbage_input", "cannot read input"),
    ("no_task_column", "has no 'text' column"),
    ("both_adapter_columns", "both 'adapter_id' and 'adapter_ids'"),
    ("unknown_task", "--task .'translate'. must be one of"),
    ("bad_model", "has no readable config.json"),
    ("bad_store", "is not a readable folder"),
    ("bad_store_entry", "has no adapter_config.json"),
    ("non_empty_output", "is not empty"),
    ("missing_flag", "missing required option.*--output"),
    ("all_cpus_to_actors", "leaving less than one for Ray Data's read and write tasks"),
    ("bad_option_value", r"max_new_tokens \(0\) must be an integer >= 1"),
    ("no_tokenizer", "has none of tokenizer.json"),
    ("no_weights", "has no \\*.safetensors weights"),
    ("yaml_wrong_type", r"option batch_size \('lots'\) must be an integer"),
])
def test_up_front_errors_exit_2_with_one_line(llama, job_input, tmp_path, case, message):
    model, store = llama
    args = {"--model": model, "--adapters": store, "--task": "generate", "--input": str(job_input),
            "--output": str(tmp_path / "out")}
    if case == "missing_input":
        args["--input"] = str(tmp_path / "nope.parquet")
    elif case == "garbage_input":
        (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
        args["--input"] = str(tmp_path / "bad.parquet")
    elif case == "no_task_column":
        args["--task"] = "classify"
    elif case == "both_adapter_columns":
        pq.write_table(pa.table({"prompt": ["x"], "adapter_id": ["a"], "adapter_ids": [["a"]]}), job_input)
    elif case == "unknown_task":
        args["--task"] = "translate"
    elif case == "bad_model":
        args["--model"] = str(tmp_path)
    elif case == "bad_store":
        args["--adapters"] = str(job_input)
    elif case == "bad_store_entry":
        (tmp_path / "store" / "stray").mkdir(parents=True)
        args["--adapters"] = str(tmp_path / "store")
    elif case == "non_empty_output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "old.parquet").write_bytes(b"x")
    elif case == "missing_flag":
        del args["--output"]
    elif case == "bad_option_value":
        args["--max-new-tokens"] = "0"
    elif case in ("no_tokenizer", "no_weights"):
        shutil.copytree(model, tmp_path / "m")
        for f in (tmp_path / "m").glob("tokenizer*" if case == "no_tokenizer" else "*.safetensors"):
            f.unlink()
        args["--model"] = str(tmp_path / "m")
    elif case == "yaml_wrong_type":
        (tmp_path / "job.yaml").write_text("batch_size: lots\n")
        args["--config"] = str(tmp_path / "job.yaml")
    extra = ["--concurrency", "2", "--num-cpus", str(os.cpu_count())] if case == "all_cpus_to_actors" else []
    result = _cli(*[x for kv in args.items() for x in kv], *extra, env={"RAY_ADDRESS": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]


def test_config_file_and_flags_win(tmp_path):
    config_file = tmp_path / "job.yaml"
    config_file.write_text("model: /m\ntask: embed\ninput: in.parquet\noutput: out\nbatch-size: 7\n"
                           "normalize: true\nmax_new_tokens: 9\n")
    config = config_from_args(["--config", str(config_file), "--batch-size", "3", "--task", "classify"])
    assert (config.batch_size, config.task, config.model, config.input) == (3, "classify", "/m", "in.parquet")
    assert config.options == {"normalize": True, "max_new_tokens": 9}
    config_file.write_text(config_file.read_text() + "colour: red\n")
    with pytest.raises(ValueError, match="unknown option.*colour"):
        config_from_args(["--config", str(config_file)])


def test_ray_job_submit_against_a_local_head(ray_cluster, llama, job_input, tmp_path):
    model, store = llama
    entry = [sys.executable, "jobs/batch_infer.py", "--model", model, "--adapters", store, "--task", "generate",
             "--input", str(job_input), "--output", str(tmp_path / "out"), "--max-new-tokens", "3",
             "--num-cpus", "0.5", "--progress-seconds", "1"]
    ray_cli = Path(sys.executable).with_name("ray")
    for attempt in range(3):  # the head's job agent can take a few seconds to come up under load
        result = subprocess.run([str(ray_cli), "job", "submit", "--address", ray_cluster.dashboard_url,
                                 "--working-dir", str(ROOT), "--", *entry], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"})
        if "No available agent" not in result.stdout + result.stderr:
            break
        _skip_if_agent_port_taken(ray_cluster)
        time.sleep(5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rows in: 2" in result.stdout and "rows out: 2" in result.stdout
    n = len([p for p in Path(store).iterdir() if p.is_dir()])
    assert f"adapters: {n} in the store, each checked up front; start-up canary: passed in every actor" in result.stdout
    assert f"adapter store: {n} adapters checked: " in result.stdout
    assert "progress: " in result.stdout  # stderr is no terminal here: a line every --progress-seconds
    assert re.search(r"wall time: [0-9.]+ s \(first output after [0-9.]+ s: ", result.stdout), result.stdout[-2000:]
    rows = _read(tmp_path / "out")
    for row in rows:
        assert (row["generated_text"], row["num_generated_tokens"], row["finish_reason"]) == \
            oracle.generate(model, store, row["adapter_id"], row["prompt"], 3)


def _skip_if_agent_port_taken(ray) -> None:
    """Another Ray cluster on this machine can hold the dashboard agent's fixed port (52365),
    which `ray.init` cannot move; then this cluster has no job agent at all."""
    log = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "dashboard_agent.log"
    if log.exists() and "failed to bind" in log.read_text():
        pytest.skip("another Ray cluster on this machine holds the dashboard agent port; no job agent here")
