"""Real faults, as a user's job meets them: `python jobs/batch_infer.py` in its own process
session, its driver or a model actor killed with SIGKILL mid-run, a row that kills its actor
every time. Every expected row must come out exactly once and equal to PEFT's."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import oracle
from pipeline.infer import POISON_ERROR, Ledger
from testkit.data import SENTENCES

ROOT = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: SWITCHYARD_TEST_DIE_AT_LENGTH
ADAPTERS = ["head-a", None, "vera", "no-head", "head-b"]
ROWS = 600
BLOCK = 15  # rows per block: 40 write tasks


def _write_input(path: Path, rows: int = ROWS, texts: list[str] | None = None) -> pa.Table:
    texts = texts or [" ".join(SENTENCES[i % len(SENTENCES)].split()[:12]) + f" {i}" for i in range(rows)]
    table = pa.table({"id": list(range(rows)), "text": texts,
                      "adapter_id": [ADAPTERS[i % len(ADAPTERS)] for i in range(rows)]})
    pq.write_table(table, path)
    return table


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """The job as a user starts it, in a process session of its own (its local Ray too)."""
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "jobs/batch_infer.py", *args], cwd=ROOT, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session (its Ray): a lost driver node."""
    subprocess.run(["pkill", "-9", "-s", str(process.pid)], check=False)
    process.wait(timeout=60)


def _session_pids(process: subprocess.Popen, title: str) -> list[int]:
    found = subprocess.run(["ps", "-s", str(process.pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in found.splitlines() if title in line]


def _committed(checkpoint: Path) -> int:
    """Write tasks whose ids Ray Data has committed."""
    folder = checkpoint / "ray"
    return sum(1 for p in folder.glob("*.parquet") if not p.name.endswith(".pending.parquet")) if folder.exists() else 0


def _wait(condition, process: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the job ended before the fault could be injected:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _check_output(output: Path, table: pa.Table, model: str, store: str, skip_ids=()) -> list[dict]:
    """Every input row exactly once, each equal to the oracle (rows in `skip_ids` returned)."""
    rows = pads.dataset(str(output), format="parquet").to_table().to_pylist()
    assert collections.Counter(r["id"] for r in rows) == collections.Counter(table.column("id").to_pylist())
    texts, adapters = table.column("text").to_pylist(), table.column("adapter_id").to_pylist()
    for row in rows:
        if row["id"] in skip_ids:
            continue
        assert row["error"] is None and row["adapter_id"] == adapters[row["id"]], row
        expected = oracle.scores(model, store, adapters[row["id"]], "classify", texts[row["id"]])
        oracle.assert_close(row["scores"], expected, what=str(row["id"]))
    return rows


def _args(model: str, store: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", model, "--adapters", store, "--task", "classify", "--input", str(tmp_path / "in.parquet"),
            "--output", str(tmp_path / "out"), "--num-cpus", "0.5", "--batch-size", "8", "--rows-per-block", str(BLOCK),
            "--progress-seconds", "0", *extra]


def test_driver_killed_halfway_then_an_actor_killed_while_resuming(bert, tmp_path):
    """The acceptance run of resume: SIGKILL the whole driver session once an eighth of the
    write tasks have committed, run the same command again, and SIGKILL its model actor
    mid-run: the job ends with every row exactly once and oracle-equal."""
    model, store = bert
    table = _write_input(tmp_path / "in.parquet")
    args = _args(model, store, tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt"), "--id-column", "id")
    blocks = ROWS // BLOCK
    first = _start(args, tmp_path / "first.log")
    _wait(lambda: _committed(tmp_path / "ckpt") >= blocks // 8, first, tmp_path / "first.log")
    _kill_session(first)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    done_before = _committed(tmp_path / "ckpt")
    assert done_before < blocks

    second = _start(args, tmp_path / "second.log")
    try:
        _wait(lambda: _committed(tmp_path / "ckpt") >= done_before + 3, second, tmp_path / "second.log")
        actors = _session_pids(second, "ray::MapWorker")
        assert actors, subprocess.run(["ps", "-s", str(second.pid), "-o", "pid=,args="], capture_output=True,
                                      text=True).stdout
        for pid in actors:
            os.kill(pid, signal.SIGKILL)
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        _kill_session(second)
    log = (tmp_path / "second.log").read_text()
    skipped = int(log.split("rows skipped as already done: ")[1].split()[0])
    assert 0 < skipped < ROWS
    assert "restarted after it died" in log
    _check_output(tmp_path / "out", table, model, store)


@pytest.mark.slow
def test_actor_killed_mid_run_without_a_checkpoint(bert, tmp_path):
    model, store = bert
    table = _write_input(tmp_path / "in.parquet")
    job = _start(_args(model, store, tmp_path), tmp_path / "job.log")
    try:
        staged = tmp_path / "out" / "_temporary"
        _wait(lambda: staged.exists() and len(list(staged.glob("*.parquet"))) >= 5, job, tmp_path / "job.log")
        for pid in _session_pids(job, "ray::MapWorker"):
            os.kill(pid, signal.SIGKILL)
        assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        _kill_session(job)
    _check_output(tmp_path / "out", table, model, store)


@pytest.mark.slow
def test_a_row_that_kills_its_actor_every_time_fails_alone(bert, tmp_path):
    """With the fault injector, any model call on inputs of exactly 40 tokens ends its
    process: the row of 40 tokens gets `internal`, its batch-mates and every other row are
    answered, and the job finishes."""
    from transformers import AutoTokenizer

    model, store = bert
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = [" ".join(SENTENCES[i % len(SENTENCES)].split()[:6]) for i in range(60)]
    poison = " ".join(["the"] * 38)
    assert len(tokenizer(poison)["input_ids"]) == 40 and max(len(tokenizer(t)["input_ids"]) for t in texts) < 40
    texts[17] = poison
    table = _write_input(tmp_path / "in.parquet", rows=60, texts=texts)
    env = {"PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
           "SWITCHYARD_TEST_DIE_AT_LENGTH": "40"}
    job = _start(_args(model, store, tmp_path), tmp_path / "job.log", env)
    try:
        assert job.wait(timeout=400) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        _kill_session(job)
    rows = _check_output(tmp_path / "out", table, model, store, skip_ids={17})
    assert next(r for r in rows if r["id"] == 17)["error"] == POISON_ERROR


def test_ledger_counts_deaths_per_actor_not_per_copy():
    """Two actors running identical rows at once do not count as a death; a restart charges
    what that actor had in flight, once."""
    ledger = Ledger()
    assert ledger.start("a1", "batch:x", "batch x") == 0
    assert ledger.start("a2", "batch:x", "batch x") == 0  # the same content elsewhere: no death
    ledger.end("a2", "batch:x")
    ledger.restarted("a1")
    assert ledger.start("a1", "batch:x", "batch x") == 1
    assert ledger.start("a1", "row:y", "row y") == 0
    ledger.restarted("a1")
    assert ledger.start("a1", "row:y", "row y") == 1 and ledger.killers() == ["row y"]
    ledger.end("a1", "row:y")
    ledger.restarted("a1")  # nothing was in flight: nothing is charged
    assert ledger.start("a1", "row:z", "row z") == 0


def test_job_metrics_count_rows_by_adapter_and_outcome():
    """What the actors export, checked against a batch built here (metrics recorded by stand-ins
    of ray.util.metrics' classes)."""
    from pipeline.infer import JobMetrics

    recorded = collections.defaultdict(list)

    class Metric:
        def __init__(self, name, description, boundaries=None, tag_keys=()):
            self.name = name

        def inc(self, value=1, tags=None):
            recorded[self.name].append((value, tuple(sorted(tags.items()))))

        def observe(self, value, tags=None):
            recorded[self.name].append((value, tuple(sorted(tags.items()))))

    metrics = type("Metrics", (), {"Counter": Metric, "Histogram": Metric})
    result = pa.table({"adapter_id": ["a", "a", None, "typo", "a", ""],
                       "error": [None, "too_long: x", None, "unknown_adapter: y", None, None]})
    JobMetrics("classify", metrics).batch(result, 0.25)
    rows = {dict(tags)["adapter"] + "/" + dict(tags)["outcome"]: n for n, tags in recorded["switchyard_job_rows"]}
    assert rows == {"a/ok": 2, "a/too_long": 1, "(base)/ok": 2, "unknown/unknown_adapter": 1}
    assert sorted(dict(tags)["adapter"] for _, tags in recorded["switchyard_job_batch_latency_s"]) == \
        ["(base)", "a", "unknown"]
    assert {n for n, _ in recorded["switchyard_job_batch_latency_s"]} == {0.25}


@pytest.mark.slow
def test_job_metrics_reach_rays_prometheus_endpoint(ray_cluster, bert, tmp_path):
    import urllib.request

    from pipeline.config import config_from_args
    from pipeline.job import run

    model, store = bert
    port = ray_cluster.nodes()[0]["MetricsExportPort"]

    def vera_rows() -> float:
        """ok rows of adapter vera over every worker's series (earlier jobs of the session included)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ray_switchyard_job_rows") and 'adapter="vera"' in line and 'outcome="ok"' in line)

    before = vera_rows()
    _write_input(tmp_path / "in.parquet", rows=40)
    run(config_from_args(["--model", model, "--adapters", store, "--task", "classify", "--input",
                          str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"), "--num-cpus", "0.5"]))
    deadline = time.monotonic() + 60
    while vera_rows() < before + 8:  # 8 of the 40 rows name vera
        assert time.monotonic() < deadline, "this job's switchyard_job_rows for vera never reached Ray's endpoint"
        time.sleep(2)
