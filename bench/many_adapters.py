"""A thousand adapters, 64 resident: rows/s against the same rows with every adapter resident.

Builds the bench Llama of bench/mixed_batch.py (hidden 256, 4 layers) and a store of
--adapters LoRA r=16 adapters on every linear layer: one saved by PEFT, the others copies of
its files with their own random tensors (same keys, shapes and config: real PEFT files, built
in seconds instead of minutes). Rows name adapters uniformly at random (a batch of 64 rows
over 1,000 adapters names about 62 distinct ones). Both Predictors run the same batches of
--batch-rows rows (task generate, max_new_tokens 1: the prefill's cost), interleaved, after a
warm-up batch each:

  - resident: `max_loaded_adapters` = every adapter of the store;
  - tiered:   `max_loaded_adapters` = --resident (64), adapters beyond it swapped into slots
              from the host-memory tier (parsed weights, `--adapter-cache-mb`) or disk.

It prints rows/s of each, their ratio (the target is >= 0.8), and checks that every row's
output is equal between the two.

With --job-rows N it also runs the batch job (2 actors, 64 slots each) on N rows, sorted by
adapter (`--cluster-by-adapter on`) and not (`off`), against the tiered Predictor in a
plain loop over the same rows.

    .venv/bin/python bench/many_adapters.py [--adapters 1000] [--resident 64] [--batches 12] [--job-rows 4096]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000, help="adapters in the store")
    p.add_argument("--resident", type=int, default=64, help="max_loaded_adapters of the tiered Predictor")
    p.add_argument("--batch-rows", type=int, default=64, help="rows per batch (one actor batch)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per Predictor")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--adapter-cache-mb", type=int, default=None, help="the tiered Predictor's host tier (default: "
                   "its default)")
    p.add_argument("--job-rows", type=int, default=0, help="also run the batch job (2 actors, --max-loaded-adapters "
                   "--resident) on this many rows, sorted by adapter and not, against the tiered Predictor in a "
                   "plain loop over the same rows (0: skip)")
    return p.parse_args(argv)


def build_store(root: Path, n: int) -> tuple[str, str]:
    """The bench model and a store of `n` LoRA adapters (1 saved by PEFT, n - 1 re-seeded copies)."""
    from safetensors.torch import load_file, save_file

    from mixed_batch import build

    model, store = build(root, 1)
    first = Path(store) / "a00"
    tensors = load_file(str(first / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for i in range(1, n):
        folder = Path(store) / f"a{i:04d}"
        folder.mkdir()
        shutil.copy(first / "adapter_config.json", folder / "adapter_config.json")
        save_file({k: torch.randn(v.shape, generator=gen) * v.std() for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))
    first.rename(Path(store) / "a0000")
    return model, store


def run_jobs(root: Path, model: str, store: str, names: list[str], texts: list[str], predictor,
             args: argparse.Namespace) -> dict:
    """The batch job sorted by adapter (`on`) and streaming (`off`), and the same rows
    through `predictor` in a plain loop of 64-row batches: rows/s of each."""
    import logging

    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import ray

    from pipeline.config import config_from_args
    from pipeline.job import run

    rng = random.Random(1)
    n = args.job_rows
    table = pa.table({"id": list(range(n)), "prompt": [texts[rng.randrange(len(texts))] for _ in range(n)],
                      "adapter_id": [rng.choice(names) for _ in range(n)]})
    pq.write_table(table, root / "job.parquet")
    started = time.perf_counter()
    loop = {}
    for start in range(0, n, 64):
        out = predictor(table.slice(start, 64))
        loop.update(zip(out.column("id").to_pylist(), out.column("generated_text").to_pylist()))
    results = {"plain loop (tiered Predictor)": {"rows/s": round(n / (time.perf_counter() - started), 1)}}
    logging.getLogger("ray").setLevel(logging.WARNING)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for mode in ("on", "off"):
            summary = run(config_from_args([
                "--model", model, "--adapters", store, "--task", "generate", "--input", str(root / "job.parquet"),
                "--output", str(root / f"out-{mode}"), "--concurrency", "2", "--num-cpus", "0.5", "--num-threads", "1",
                "--max-loaded-adapters", str(args.resident), "--no-canary", "--max-new-tokens", "1",
                "--cluster-by-adapter", mode, "--quick-adapter-check"]))
            rows = pads.dataset(str(root / f"out-{mode}"), format="parquet").to_table().to_pylist()
            same = sum(loop.get(r["id"]) == r["generated_text"] for r in rows)
            name = f"job, --cluster-by-adapter {mode}"
            results[name] = {"rows/s": round(n / summary.seconds, 1), "steady rows/s": round(summary.steady_rate or 0, 1),
                             "first output s": round(summary.startup_seconds or 0, 1), "equal to the loop": f"{same}/{n}"}
    finally:
        ray.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    from actors.predictor import Predictor
    from mixed_batch import prompts

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model, store = build_store(Path(tmp), args.adapters)
        print(f"store of {args.adapters} adapters built in {time.perf_counter() - started:.1f} s")
        names = sorted(p.name for p in Path(store).iterdir())
        tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(model)
        texts = prompts(tokenizer, 64)
        rng = random.Random(0)
        batches = [{"prompt": [texts[rng.randrange(len(texts))] for _ in range(args.batch_rows)],
                    "adapter_id": [rng.choice(names) for _ in range(args.batch_rows)]}
                   for _ in range(args.batches + 1)]
        distinct = statistics.mean(len(set(b["adapter_id"])) for b in batches)
        options = {} if args.adapter_cache_mb is None else {"adapter_cache_mb": args.adapter_cache_mb}
        predictors = {}
        for name, loaded in (("resident", args.adapters), ("tiered", args.resident)):
            started = time.perf_counter()
            predictors[name] = Predictor(model=model, adapters=store, task="generate", max_new_tokens=1,
                                         max_loaded_adapters=loaded, canary=False, **options)
            print(f"{name}: started in {time.perf_counter() - started:.1f} s")
        outputs = {name: [] for name in predictors}
        seconds = {name: [] for name in predictors}
        for i, batch in enumerate(batches):
            for name, predictor in predictors.items():
                start = time.perf_counter()
                out = predictor(dict(batch))
                if i:  # the first batch warms up
                    seconds[name].append(time.perf_counter() - start)
                    outputs[name].append(out)
        rows = args.batch_rows * args.batches
        rates = {name: rows / sum(s) for name, s in seconds.items()}
        same = sum(a == b for x, y in zip(outputs["resident"], outputs["tiered"])
                   for a, b in zip(x["generated_text"], y["generated_text"]))
        errors = sum(e is not None for out in outputs["tiered"] for e in out["error"])
        jobs = run_jobs(Path(tmp), model, store, names, texts, predictors["tiered"], args) if args.job_rows else {}
        runtime = predictors["tiered"].runtime
        tiers = {"slot_loads": runtime.slot_loads, "disk_reads": runtime.disk_reads,
                 "host_tier_adapters": len(runtime.host), "host_tier_mib": round(runtime.host.bytes / 2**20)}
    print(json.dumps({"adapters": args.adapters, "resident": args.resident, "batch_rows": args.batch_rows,
                      "mean_distinct_adapters_per_batch": round(distinct, 1)}))
    print(f"{'predictor':<10} {'rows/s':>8} {'median s/batch':>15}")
    for name in predictors:
        print(f"{name:<10} {rates[name]:8.1f} {statistics.median(seconds[name]):15.3f}")
    print(f"tiered runtime since start-up: {json.dumps(tiers)}")
    print(f"tiered / resident rows/s: {rates['tiered'] / rates['resident']:.2f} (target >= 0.8)")
    print(f"outputs equal row for row: {same}/{rows}; errors in tiered rows: {errors}")
    if jobs:
        print(f"\nbatch job, {args.job_rows} rows, 2 actors (0.5 CPU, 1 torch thread each), --max-loaded-adapters "
              f"{args.resident}, --no-canary; plain loop: the tiered Predictor (2 threads) over the same rows")
        for name, figures in jobs.items():
            print(f"{name:<28} " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    return 0 if same == rows and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
