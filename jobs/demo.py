"""`make demo`: build the demo model, adapters and input (unless --model is given), start a
local Ray head of its own, submit the batch job with `ray job submit`, show the summary and
some rows, and stop that head (only it: other Ray instances on the machine are left alone)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
START_TIMEOUT_S = 120


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Demo flags: where to build, and an optional real model/store/input instead."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default=str(ROOT / "demo_out"), help="where demo assets and output go")
    p.add_argument("--model", help="your model folder (default: build a small demo Llama)")
    p.add_argument("--adapters", help="your adapter store (with --model)")
    p.add_argument("--input", help="your Parquet input with prompt and adapter_id/adapter_ids (with --model)")
    from actors.config import TASKS

    p.add_argument("--task", default="generate", choices=TASKS,
                   help="the job's task (the built-in demo is generate; another task needs --model and --input)")
    p.add_argument("--rows", type=int, default=240, help="rows of the built-in demo input")
    args = p.parse_args(argv)
    if args.task != "generate" and not args.model:
        p.error("the built-in demo model is a generate model: give --model, --input (and --adapters) for "
                f"--task {args.task}")
    return args


def ray_env() -> dict[str, str]:
    """The environment of the demo's `ray` commands: token auth off (the head listens on
    127.0.0.1 only), no progress bars."""
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment (.venv/bin/ray), not whatever is on PATH."""
    return str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def local_head(num_cpus: int = 2) -> Iterator[str]:
    """A Ray head of the demo's own (free ports, its own temp dir, `ray start --block` in a
    process group of its own), yielding its dashboard address; on exit, that process group
    alone is stopped. If Ray cannot start, its own output is shown and the demo exits."""
    ports = dict(zip(HEAD_PORTS, free_ports(len(HEAD_PORTS))))
    temp = tempfile.mkdtemp(prefix="sy-ray-")  # short: Ray's socket paths must stay under ~107 chars
    log = Path(temp) / "ray-start.log"
    command = [ray_executable(), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--dashboard-host",
               "127.0.0.1", "--node-ip-address", "127.0.0.1", "--temp-dir", temp, "--disable-usage-stats"]
    command += [str(x) for flag, port in ports.items() for x in (flag, port)]
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    with open(log, "w") as out:
        head = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ray_env(), cwd=ROOT,
                                start_new_session=True)
    try:
        _wait_for(address, head, log)
        print(f"local Ray head up: dashboard {address}, GCS 127.0.0.1:{ports['--port']}, temp dir {temp}")
        yield address
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(address: str, head: subprocess.Popen, log: Path) -> None:
    """Return once the head's dashboard answers; exit with Ray's own output if it died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.poll() is not None:
            sys.exit(f"demo: `ray start --head` failed (exit {head.returncode}); Ray said:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return
        except OSError:
            time.sleep(1)
    _stop(head)
    sys.exit(f"demo: the Ray head did not answer on {address} within {START_TIMEOUT_S} s; Ray said:\n"
             f"{log.read_text()}")


def _stop(head: subprocess.Popen) -> None:
    """Stop the head's process group (its GCS, raylet, dashboard and workers), gently first."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, sig)
        try:
            head.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def job_arguments(paths: dict, task: str, output: Path) -> list[str]:
    """The batch job's flags for the demo run."""
    job = ["--model", paths["model"], "--task", task, "--input", paths["input"], "--output", str(output),
           "--overwrite", "--concurrency", "2", "--num-cpus", "0.5", "--batch-size", "32"]
    if task == "generate":
        job += ["--max-new-tokens", "16"]
    if paths.get("adapters"):
        job += ["--adapters", paths["adapters"]]
    return job


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    if args.model:
        paths = {"model": args.model, "adapters": args.adapters, "input": args.input}
    else:
        from pipeline.demo import build_demo

        print(f"building the demo model, adapters and input under {work} ...")
        paths = build_demo(work, rows=args.rows)
    output = work / "output"
    print("starting a local Ray head of the demo's own (ray start --head) ...")
    with local_head() as address:
        submitted = subprocess.run([ray_executable(), "job", "submit", "--address", address, "--working-dir",
                                    str(ROOT), "--", sys.executable, "jobs/batch_infer.py",
                                    *job_arguments(paths, args.task, output)], env=ray_env(), cwd=ROOT)
    if submitted.returncode:
        print(f"demo: the job failed (ray job submit exited {submitted.returncode}); its output is above",
              file=sys.stderr)
        return submitted.returncode
    show(output, args.task)
    return 0


def show(output: Path, task: str = "generate") -> None:
    """A few output rows: base, adapter, fan-out and error rows."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(output), format="parquet").to_table()
    if "request_id" in table.column_names:
        table = table.sort_by("request_id")
    wanted = ["request_id", "adapter_id", "generated_text", "num_generated_tokens", "finish_reason", "label",
              "error"]
    columns = [c for c in wanted if c in table.column_names]
    print(f"\n{table.num_rows} rows in {output}; the first ten", end="")
    print(" (the demo model has random weights, so the text is noise; what the demo shows is every row going "
          "through its own adapter in shared batches):" if task == "generate" else ":")
    for row in table.select(columns).slice(0, 10).to_pylist():
        print("  " + ", ".join(f"{k}={row[k]!r}" for k in columns))


if __name__ == "__main__":
    sys.exit(main())
