"""The batch job never loses the user's data: output locations, completion marker, empty
input, unwritable or full output, non-finite parameters, messages that name the file."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.paths import check_not_overlapping

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, limit_file_bytes: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python jobs/batch_infer.py ARGS` as a user runs it (a local Ray of its own)."""
    def limit():
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "jobs/batch_infer.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=limit)


def _one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single stderr line of a refused job."""
    assert result.returncode == code, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(llama, tmp_path):
    """A private copy of the Llama model and store plus an input folder, all under tmp_path."""
    model, store = llama
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(store, tmp_path / "store")
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"id": [0, 1], "prompt": ["hello", "the cat"], "adapter_id": ["lora-qv", None]}),
                   tmp_path / "data" / "in.parquet")
    return tmp_path


def _args(ws: Path, output: Path | str, *extra: str) -> list[str]:
    return ["--model", str(ws / "model"), "--adapters", str(ws / "store"), "--task", "generate",
            "--input", str(ws / "data" / "in.parquet"), "--output", str(output), "--max-new-tokens", "2",
            "--num-cpus", "0.5", *extra]


@pytest.mark.parametrize("where, relation", [
    ("data", "is the input"),                       # the folder holding the input file
    ("data/in.parquet", "is the input"),
    ("data/in.parquet/x", "lies inside the input"),
    (".", "contains the input"),                    # the parent of everything
    ("model", "is the model folder"),
    ("model/out", "lies inside the model folder"),
    ("store", "is the adapter store"),
    ("store/lora-qv", "lies inside the adapter store"),
    ("link-to-model", "is the model folder"),       # a symlink resolves to the model
    ("link-to-model/sub", "lies inside the model folder"),
])
def test_overwrite_never_deletes_input_model_or_store(workspace, where, relation):
    ws = workspace
    (ws / "link-to-model").symlink_to(ws / "model")
    before = {name: _snapshot(ws / name) for name in ("data", "model", "store")}
    args = _args(ws, ws / where, "--overwrite")
    if where == "data":  # the input named as its folder, the output the same folder
        args[args.index("--input") + 1] = str(ws / "data")
    line = _one_error_line(_cli(*args))
    assert relation in line and "pass an output folder outside" in line, line
    assert {name: _snapshot(ws / name) for name in before} == before  # nothing deleted, nothing written


@pytest.mark.parametrize("output, protected, relation", [
    ("s3://bucket/data", {"input": "s3://bucket/data/"}, "is"),
    ("s3://bucket/data/out", {"input": "s3://bucket/data"}, "lies inside"),
    ("s3://bucket", {"input": "s3://bucket/data/part-0.parquet"}, "contains"),
    ("gs://b/x/../data", {"input": "gs://b/data"}, "is"),
    ("s3://other/data", {"input": "s3://bucket/data"}, None),
    ("s3://bucket/data2", {"input": "s3://bucket/data"}, None),
    ("/tmp/data", {"input": "s3://bucket/tmp/data"}, None),
])
def test_output_overlap_by_uri(output, protected, relation):
    if relation is None:
        check_not_overlapping(output, protected)
        return
    with pytest.raises(ValueError, match=f"--output '{output}' {relation} the input"):
        check_not_overlapping(output, protected)


def test_a_failed_check_deletes_nothing(workspace):
    """--overwrite empties the output only after every up-front check passed."""
    ws = workspace
    (ws / "out").mkdir()
    (ws / "out" / "keep.parquet").write_bytes(b"precious")
    line = _one_error_line(_cli(*_args(ws, ws / "out", "--overwrite", "--max-new-tokens", "0")))
    assert "max_new_tokens (0)" in line
    assert (ws / "out" / "keep.parquet").read_bytes() == b"precious"


def test_complete_run_has_success_marker_with_summary(ray_cluster, workspace):
    from pipeline.config import config_from_args
    from pipeline.job import run

    ws = workspace
    summary = run(config_from_args(_args(ws, ws / "out")))
    marker = json.loads((ws / "out" / "_SUCCESS").read_text())
    table = pads.dataset(str(ws / "out"), format="parquet").to_table()
    assert marker["rows_in"] == 2 and marker["rows_out"] == table.num_rows == 2 == summary.rows_out
    assert marker["per_adapter"] == {"lora-qv": 1, "(base)": 1} and marker["errors"] == {}
    assert not (ws / "out" / "_temporary").exists()
    assert sorted(p.name for p in (ws / "out").iterdir() if not p.name.endswith(".parquet")) == ["_SUCCESS"]


@pytest.mark.parametrize("leftover, found", [
    ({"_temporary/part-0.parquet": b"half"}, "an incomplete earlier run"),
    ({"part-0.parquet": b"x"}, "an incomplete earlier run"),
    ({"part-0.parquet": b"x", "_SUCCESS": b"{}"}, r"the complete output of an earlier run \(_SUCCESS"),
    ({"notes.txt": b"x"}, "1 entries, e.g. 'notes.txt'"),
])
def test_rerun_on_a_used_folder_says_what_it_found(workspace, leftover, found):
    ws = workspace
    for name, data in leftover.items():
        (ws / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / "out" / name).write_bytes(data)
    line = _one_error_line(_cli(*_args(ws, ws / "out")))
    assert __import__("re").search(f"is not empty: it holds {found}.*--overwrite", line), line


@pytest.mark.slow  # tests/test_faults.py kills a driver in the default run
def test_killed_driver_leaves_an_output_readers_see_as_incomplete(workspace):
    """SIGKILL the job while it writes: no `_SUCCESS`, no readable Parquet file, and the rerun
    names what it found."""
    ws = workspace
    rows = 400
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": ["the cat sat on the mat"] * rows,
                             "adapter_id": ["lora-qv", "vera", None, "lora-rs"] * (rows // 4)}),
                   ws / "data" / "in.parquet")
    env = {**os.environ, "RAY_ADDRESS": ""}
    args = _args(ws, ws / "out", "--max-new-tokens", "8", "--batch-size", "20", "--concurrency", "1")
    job = subprocess.Popen([sys.executable, "jobs/batch_infer.py", *args], cwd=ROOT, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((ws / "out").glob("_temporary/*.parquet")):  # the first block is staged
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before staging a file"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()  # its whole process group (driver and the local Ray it started) is gone
    assert not (ws / "out" / "_SUCCESS").exists()
    assert pads.dataset(str(ws / "out"), format="parquet").to_table().num_rows == 0  # nothing readable yet
    line = _one_error_line(_cli(*_args(ws, ws / "out")))
    assert "an incomplete earlier run (no _SUCCESS marker" in line, line


def test_zero_row_input_writes_an_empty_output_with_the_schema(workspace):
    ws = workspace
    schema = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("adapter_id", pa.string()),
                        ("score", pa.float32())])
    pq.write_table(schema.empty_table(), ws / "data" / "in.parquet")
    result = _cli(*_args(ws, ws / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rows in: 0" in result.stdout and "rows out: 0" in result.stdout
    written = pads.dataset(str(ws / "out"), format="parquet")
    assert written.to_table().num_rows == 0
    expected = [("id", pa.int64()), ("prompt", pa.string()), ("score", pa.float32()), ("adapter_id", pa.string()),
                ("adapter_version", pa.string()), ("generated_text", pa.string()), ("num_input_tokens", pa.int64()),
                ("num_generated_tokens", pa.int64()), ("finish_reason", pa.string()), ("error", pa.string())]
    assert [(f.name, f.type) for f in written.schema] == expected
    assert json.loads((ws / "out" / "_SUCCESS").read_text())["rows_out"] == 0


def test_output_under_a_file_is_refused_up_front(workspace):
    ws = workspace
    (ws / "a-file").write_text("x")
    line = _one_error_line(_cli(*_args(ws, ws / "a-file" / "out")))
    assert "cannot write to output" in line and "Not a directory" in line, line


def test_output_that_cannot_hold_a_file_is_refused_up_front(workspace):
    """A file-size limit makes the probe's write fail as a full disk does (no root needed)."""
    ws = workspace
    line = _one_error_line(_cli(*_args(ws, ws / "out"), limit_file_bytes=16 * 1024))
    assert "cannot write to output" in line and "pass a writable folder" in line, line
    assert not (ws / "out").exists()  # the probe and the folder made for it were removed


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at `path` (needs root and mount); skips the test where it cannot be made."""
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_output_is_refused_up_front(workspace):
    ws = workspace
    if os.geteuid() != 0:  # permissions bind a normal user; root needs a read-only mount
        (ws / "ro").mkdir(mode=0o555)
        line = _one_error_line(_cli(*_args(ws, ws / "ro" / "out")))
        assert "cannot write to output" in line, line
        return
    with _tmpfs(ws / "ro", "1m", read_only=True):
        line = _one_error_line(_cli(*_args(ws, ws / "ro" / "out")))
    assert "cannot write to output" in line and "Read-only file system" in line, line


def test_full_disk_up_front_is_refused(workspace):
    ws = workspace
    with _tmpfs(ws / "full", "16k"):
        line = _one_error_line(_cli(*_args(ws, ws / "full" / "out")))
    assert "cannot write to output" in line and "No space left on device" in line, line


@pytest.mark.slow  # a whole job on a local Ray of its own (about a minute), and it needs root to mount a tmpfs
def test_full_disk_mid_run_fails_with_one_line_and_no_unreadable_file(workspace):
    """The probe fits, the output does not: one line naming the path, exit 1, and nothing
    under a readable name that a reader cannot parse."""
    ws = workspace
    rows = 64
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": ["hi"] * rows, "adapter_id": [None] * rows,
                             "blob": [os.urandom(4096).hex() for _ in range(rows)]}),  # ~512 KiB to write back
                   ws / "data" / "in.parquet")
    with _tmpfs(ws / "small", "256k") as small:
        result = _cli(*_args(ws, small / "out", "--max-new-tokens", "1"))
        line = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and line.startswith("batch_infer: error: writing output"), result.stderr[-3000:]
        assert str(small / "out") in line and "No space left on device" in line, line
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert not (small / "out" / "_SUCCESS").exists()
        for path in (small / "out").rglob("*.parquet"):
            pq.read_metadata(path)  # anything left under a readable name must be readable
        assert not (small / "out" / "_temporary").exists()


@pytest.mark.parametrize("flag, value", [("--temperature", "inf"), ("--temperature", "nan"),
                                         ("--top-p", "nan"), ("--temperature", "-inf")])
def test_non_finite_flags_exit_2(workspace, flag, value):
    line = _one_error_line(_cli(*_args(workspace, workspace / "out", f"{flag}={value}")))
    assert "must be" in line and flag.lstrip("-").replace("-", "_") in line, line


def test_non_finite_row_parameters_are_bad_parameter(llama):
    """NaN and inf in a row's columns are values, refused alike (pyarrow keeps NaN apart from null)."""
    from actors import Predictor

    model, store = llama
    p = Predictor(model=model, adapters=store, task="generate", max_new_tokens=2, canary=False)
    nan, inf = float("nan"), float("inf")
    table = pa.table({"prompt": ["a b", "a b", "a b", "a b", "a b"],
                      "temperature": pa.array([nan, inf, None, 0.0, -inf], type=pa.float64()),
                      "max_new_tokens": pa.array([None, None, nan, inf, None], type=pa.float64())})
    errors = p(table).column("error").to_pylist()
    assert errors[0].startswith("bad_parameter: temperature (nan)")
    assert errors[1].startswith("bad_parameter: temperature (inf)")
    assert errors[2].startswith("bad_parameter: max_new_tokens (nan)")
    assert errors[3].startswith("bad_parameter: max_new_tokens (inf)")
    assert errors[4].startswith("bad_parameter: temperature (-inf)")


def test_corrupt_file_in_an_input_folder_is_named(workspace):
    ws = workspace
    shutil.copy(ws / "data" / "in.parquet", ws / "data" / "b.parquet")
    (ws / "data" / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    args = _args(ws, ws / "out")
    args[args.index("--input") + 1] = str(ws / "data")
    line = _one_error_line(_cli(*args))
    assert f"file '{ws / 'data' / 'c.parquet'}' is not valid Parquet" in line, line


def test_files_disagreeing_on_a_column_type_are_both_named(workspace):
    ws = workspace
    pq.write_table(pa.table({"id": ["zero"], "prompt": ["hello"], "adapter_id": [None]},
                            schema=pa.schema([("id", pa.string()), ("prompt", pa.string()),
                                              ("adapter_id", pa.string())])), ws / "data" / "z.parquet")
    args = _args(ws, ws / "out")
    args[args.index("--input") + 1] = str(ws / "data")
    line = _one_error_line(_cli(*args))
    assert "disagree on column 'id'" in line and "in.parquet' has int64" in line and "z.parquet' has string" in line


def test_a_file_without_the_task_column_is_named(workspace):
    ws = workspace
    pq.write_table(pa.table({"id": [5], "adapter_id": ["lora-qv"]}), ws / "data" / "z.parquet")
    args = _args(ws, ws / "out")
    args[args.index("--input") + 1] = str(ws / "data")
    line = _one_error_line(_cli(*args))
    assert f"input file '{ws / 'data' / 'z.parquet'}' has no 'prompt' column" in line, line
