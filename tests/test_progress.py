"""The job's progress reader: rows counted from the staged files' Parquet footers, and the
start-up / steady-state split computed from the files' modification times."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.config import config_from_args
from pipeline.progress import Progress
from pipeline.write import check_output


def _stage(folder, name: str, rows: int, mtime: float) -> None:
    path = folder / name
    pq.write_table(pa.table({"x": list(range(rows))}), path)
    os.utime(path, (mtime, mtime))


def test_rows_and_split_from_the_staged_files(tmp_path):
    output = check_output(str(tmp_path / "out"), overwrite=False)
    staging = tmp_path / "out" / "_temporary"
    staging.mkdir(parents=True)
    progress = Progress(output.staging, rows_in=100, every=0)
    progress.started = 1000.0
    assert progress.split(1100.0) == (None, None)  # nothing written yet
    _stage(staging, "a.parquet", 10, 1020.0)  # first output 20 s after the start
    _stage(staging, "b.parquet", 30, 1050.0)
    (staging / "c.parquet.tmp").write_bytes(b"not parquet yet")
    with progress:
        pass
    assert progress.rows == 40
    startup, steady = progress.split(1060.0)
    assert startup == pytest.approx(20.0, abs=0.01)
    assert steady == pytest.approx(30 / 40.0, rel=1e-3)  # the 30 later rows over the 40 s after the first file


def test_a_single_file_has_no_steady_rate(tmp_path):
    output = check_output(str(tmp_path / "out"), overwrite=False)
    (tmp_path / "out" / "_temporary").mkdir(parents=True)
    progress = Progress(output.staging, rows_in=5, every=0)
    _stage(tmp_path / "out" / "_temporary", "only.parquet", 5, progress.started + 3)
    progress.poll()
    startup, steady = progress.split(progress.started + 4)
    assert startup == pytest.approx(3.0, abs=0.01) and steady is None
    assert isinstance(output.staging.fs, pafs.LocalFileSystem)


@pytest.mark.parametrize(("flags", "threads"), [([], 1), (["--num-cpus", "3"], 3), (["--num-threads", "2"], 2),
                                                (["--num-cpus", "0.5", "--num-threads", "4"], 4),
                                                (["--num-gpus", "1"], None)])
def test_actor_threads(flags, threads):
    config = config_from_args(["--model", "m", "--task", "generate", "--input", "i", "--output", "o", *flags])
    assert config.predictor_kwargs()["num_threads"] == threads


def test_thread_and_progress_flags_are_checked():
    base = ["--model", "m", "--task", "generate", "--input", "i", "--output", "o"]
    with pytest.raises(ValueError, match=r"--num-threads \(0\) must be >= 1"):
        config_from_args([*base, "--num-threads", "0"])
    with pytest.raises(ValueError, match=r"--progress-seconds \(-1.0\) must be >= 0"):
        config_from_args([*base, "--progress-seconds", "-1"])


@pytest.mark.parametrize(("rows", "min_blocks", "largest", "expected"), [
    (20000, 4, 1000, 1000),  # many rows: blocks of at most `largest`, so output is written as the job goes
    (240, 4, 1000, 60),  # the demo: one block per actor and a spare
    (2, 4, 1000, 1),
    (0, 4, 1000, 1),
])
def test_block_rows(rows, min_blocks, largest, expected):
    from pipeline.read import block_rows

    assert block_rows(rows, min_blocks, largest) == expected


@pytest.mark.slow  # tests/test_faults.py waits for files committed block by block
def test_output_reaches_storage_block_by_block(ray_cluster, llama, tmp_path):
    """40 rows in blocks of 10: four output files, written one after another, so the summary
    has a steady rate after the first one."""
    from test_job import _job

    model, store = llama
    table = pa.table({"id": list(range(40)), "prompt": ["hello there"] * 40, "adapter_id": ["lora-qv", None] * 20})
    rows = _job(tmp_path, model, store, "generate", table, "--max-new-tokens", "1", "--rows-per-block", "10")
    assert len(rows) == 40
    files = [p for p in (tmp_path / "out").iterdir() if p.suffix == ".parquet"]
    assert len(files) == 4 and sorted(pq.ParquetFile(p).metadata.num_rows for p in files) == [10, 10, 10, 10]
