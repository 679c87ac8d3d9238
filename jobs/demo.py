"""`make demo`: build the demo model, adapters and input (unless --model is given), start a
local Ray head, submit the batch job with `ray job submit`, show the summary and some rows."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DASHBOARD = "http://127.0.0.1:8265"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Demo flags: where to build, and an optional real model/store/input instead."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default=str(ROOT / "demo_out"), help="where demo assets and output go")
    p.add_argument("--model", help="your model folder (default: build a small demo Llama)")
    p.add_argument("--adapters", help="your adapter store (with --model)")
    p.add_argument("--input", help="your Parquet input with prompt and adapter_id/adapter_ids (with --model)")
    p.add_argument("--rows", type=int, default=240, help="rows of the built-in demo input")
    return p.parse_args(argv)


def ray_cli(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    """Run the `ray` CLI of this interpreter's environment (auth off: a loopback-only demo head)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    ray = Path(sys.executable).with_name("ray")
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run([str(ray), *args], check=check, env=env, cwd=ROOT, stdout=out, stderr=out)


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
    print("starting a local Ray head (ray start --head) ...")
    ray_cli("start", "--head", "--num-cpus", "2", "--dashboard-host", "127.0.0.1", "--disable-usage-stats",
            quiet=True)
    try:
        job = ["--model", paths["model"], "--task", "generate", "--input", paths["input"], "--output", str(output),
               "--overwrite", "--max-new-tokens", "16", "--concurrency", "2", "--num-cpus", "0.5", "--batch-size", "32"]
        if paths.get("adapters"):
            job += ["--adapters", paths["adapters"]]
        ray_cli("job", "submit", "--address", DASHBOARD, "--working-dir", str(ROOT), "--",
                sys.executable, "jobs/batch_infer.py", *job)
    finally:
        ray_cli("stop", check=False, quiet=True)
    show(output)
    return 0


def show(output: Path) -> None:
    """A few output rows: base, adapter, fan-out and error rows."""
    import pyarrow.dataset as pads

    table = pads.dataset(str(output), format="parquet").to_table()
    if "request_id" in table.column_names:
        table = table.sort_by("request_id")
    wanted = ["request_id", "adapter_id", "generated_text", "num_generated_tokens", "finish_reason", "error"]
    columns = [c for c in wanted if c in table.column_names]
    print(f"\n{table.num_rows} rows in {output}; the first ten (the demo model has random weights, so the")
    print("text is noise; what the demo shows is every row going through its own adapter in shared batches):")
    for row in table.select(columns).slice(0, 10).to_pylist():
        print("  " + ", ".join(f"{k}={row[k]!r}" for k in columns))


if __name__ == "__main__":
    sys.exit(main())
