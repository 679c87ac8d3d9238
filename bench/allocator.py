"""tcmalloc against glibc's malloc for the model calls (`--allocator`, actors/allocator.py).

An allocator is chosen when a process starts, so each measurement is a fresh process: per
round, one with tcmalloc preloaded (`LD_PRELOAD`, as the job's actors and Serve's replicas get
it) and one without, in turn. Each process loads `bench/mixed_batch.py`'s Llama and 8 LoRA
adapters, and times (after a warm-up) the bare base model's `generate` and Switchyard's
mixed batch (32 rows over --adapters adapters, --new-tokens tokens); medians of --reps
calls per process, then medians over the rounds.

    .venv/bin/python bench/allocator.py [--rounds 3] [--reps 3] [--new-tokens 64] [--adapters 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(root: str, adapters: int, new_tokens: int, reps: int) -> None:
    """One process's medians, as a JSON line: base and ours seconds per batch."""
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mixed_batch as mb
    from actors import Predictor
    from actors.allocator import running_allocator

    torch.set_num_threads(2)
    model_dir, store = f"{root}/model", f"{root}/store"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ours = Predictor(model=model_dir, adapters=store, task="generate", max_new_tokens=1, canary=False)
    texts = mb.prompts(tokenizer, 32)
    names = [ours.adapter_ids[i % adapters] for i in range(32)]
    table = pa.table({"prompt": texts, "adapter_id": names, "max_new_tokens": [new_tokens] * 32})
    runs = {"base": lambda: mb.run_base(base, tokenizer, texts, new_tokens), "ours": lambda: ours(table)}
    for fn in runs.values():
        mb.timed(fn)
    times = {key: [] for key in runs}
    for _ in range(reps):
        for key, fn in runs.items():
            times[key].append(mb.timed(fn))
    print(json.dumps({"allocator": running_allocator(), **{k: statistics.median(v) for k, v in times.items()}}))


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--rounds", type=int, default=3)
    args.add_argument("--reps", type=int, default=3)
    args.add_argument("--new-tokens", type=int, default=64)
    args.add_argument("--adapters", type=int, default=8)
    args.add_argument("--worker", help=argparse.SUPPRESS)
    opts = args.parse_args()
    bench = str(Path(__file__).resolve().parent)
    if opts.worker:
        sys.path.insert(0, bench)
        worker(opts.worker, opts.adapters, opts.new_tokens, opts.reps)
        return
    from actors.allocator import allocator_env

    preload = allocator_env("tcmalloc")  # refuses when tcmalloc is not installed
    sys.path.insert(0, bench)
    import mixed_batch as mb

    results: dict[str, list[dict]] = {"system": [], "tcmalloc": []}
    with tempfile.TemporaryDirectory() as tmp:
        mb.build(Path(tmp), opts.adapters)
        plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        for _ in range(opts.rounds):
            for name, env in (("system", plain), ("tcmalloc", {**plain, **preload})):
                out = subprocess.run([sys.executable, __file__, "--worker", tmp, "--adapters", str(opts.adapters),
                                      "--new-tokens", str(opts.new_tokens), "--reps", str(opts.reps)],
                                     env=env, capture_output=True, text=True, check=True)
                line = json.loads(out.stdout.strip().splitlines()[-1])
                assert line["allocator"] == name, line
                results[name].append(line)
    print(f"{opts.rounds} rounds, {opts.reps} reps per process, 32 rows over {opts.adapters} adapters, "
          f"{opts.new_tokens} new tokens, 2 torch threads; seconds per batch (median over rounds)")
    med = {name: {k: statistics.median(r[k] for r in rows) for k in ("base", "ours")} for name, rows in results.items()}
    for name, m in med.items():
        print(f"{name:<9} base {m['base']:.3f}  ours {m['ours']:.3f}  ours/base {m['ours'] / m['base']:.2f}   per round: "
              + ", ".join(f"{r['base']:.3f}/{r['ours']:.3f}" for r in results[name]))
    for k in ("base", "ours"):
        print(f"{k}: tcmalloc / system = {med['tcmalloc'][k] / med['system'][k]:.2f}")


if __name__ == "__main__":
    main()
