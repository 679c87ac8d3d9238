"""Online load: the Serve deployment under a bounded loopback load vs the same Predictor in a
plain loop (docs/contract.md "Online", "Performance").

Builds testkit's small Llama with --adapters LoRA adapters (r=16 on every linear layer),
deploys it on a local Ray (one replica, 1 CPU, 1 torch thread) behind 127.0.0.1, and sends
--requests completion requests (one prompt each) from --concurrency concurrent clients, twice:
  - single: every request names the same adapter,
  - mixed:  requests cycle over every adapter and the base model.
For each batcher (Switchyard's coalescer, Ray's @serve.batch) and pattern it prints
requests/s, p50/p99 latency, the mean coalesced batch (rows and requests per Predictor call,
from /v1/stats) and online rows/s as a ratio to offline rows/s: the same Predictor (1 torch
thread) called in a plain loop on the same rows, in batches of --concurrency rows (the most
the server can coalesce with that many clients). Everything shares the machine's cores:
client, Serve's HTTP proxy and the replica.

    .venv/bin/python bench/serve_load.py [--requests 256] [--concurrency 16] [--max-tokens 16]
                                         [--batch-wait-timeout-s 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=256, help="requests per traffic pattern")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (and max_batch_size)")
    p.add_argument("--adapters", type=int, default=8, help="LoRA adapters in the store")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (greedy)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01, help="the server's batch wait")
    p.add_argument("--batchers", nargs="+", default=["coalescer", "serve.batch"], help="batchers to compare")
    p.add_argument("--allocator", default="system", choices=["auto", "tcmalloc", "system"],
                   help="the model replica's memory allocator")
    return p.parse_args(argv)


def build(root: Path, n_adapters: int) -> tuple[str, str, list[str]]:
    """testkit's small Llama and a store of LoRA adapters (r=16, all linear layers)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from testkit.adapters import save_adapter
    from testkit.models import build_llama

    model = build_llama(root / "model")
    names = [f"adapter-{i}" for i in range(n_adapters)]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, name in enumerate(names):
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        save_adapter(model, root / "store", name, lora, model_class=AutoModelForCausalLM, seed=i + 1)
    return model, str(root / "store"), names


def traffic(names: list[str], requests: int) -> dict[str, list[tuple[str | None, str]]]:
    """(adapter or None, prompt) per request, for each pattern."""
    from testkit.data import SENTENCES

    prompts = [SENTENCES[i % len(SENTENCES)][: 12 + (i * 7) % 30] for i in range(requests)]
    mixed = [*names, None]
    return {"single": [(names[0], p) for p in prompts],
            "mixed": [(mixed[i % len(mixed)], p) for i, p in enumerate(prompts)]}


async def load(url: str, base: str, rows: list[tuple[str | None, str]], concurrency: int, max_tokens: int
               ) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) of `rows` sent by `concurrency` clients."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            adapter, prompt = queue.get_nowait()
            started = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json={"model": adapter or base, "prompt": prompt,
                                                               "max_tokens": max_tokens})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


@contextlib.contextmanager
def local_serve():
    """A local Ray (2 CPUs) with Serve's HTTP proxy on a free loopback port; yields its URL and
    shuts both down after."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def run_online(model: str, store: str, patterns: dict, args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    """Deploy on a local Ray once per batcher, run every pattern, shut everything down."""
    results = {}
    with local_serve() as url:
        for batcher in args.batchers:
            results.update(measure(url, model, store, patterns, args, batcher))
    return results


def measure(url: str, model: str, store: str, patterns: dict, args: argparse.Namespace, batcher: str
            ) -> dict[tuple[str, str], dict]:
    """Figures of every pattern against one deployment."""
    import httpx
    from ray import serve

    from actors.serve import build_app

    serve.run(build_app({"model": model, "adapters": store, "task": "generate", "num_cpus": 1, "batcher": batcher,
                         "max_new_tokens": args.max_tokens, "max_batch_size": args.concurrency,
                         "batch_wait_timeout_s": args.batch_wait_timeout_s, "allocator": args.allocator}),
              name="bench", route_prefix="/")
    base, results = Path(model).name, {}
    for name, rows in patterns.items():
        asyncio.run(load(url, base, rows[: 2 * args.concurrency], args.concurrency, args.max_tokens))  # warm-up
        before = httpx.get(f"{url}/v1/stats").json()
        wall, latencies = asyncio.run(load(url, base, rows, args.concurrency, args.max_tokens))
        after = httpx.get(f"{url}/v1/stats").json()
        batches = after["batches"] - before["batches"]
        results[batcher, name] = {
            "rps": len(rows) / wall, "p50": statistics.median(latencies),
            "p99": statistics.quantiles(latencies, n=100)[98],
            "batch_rows": (after["rows"] - before["rows"]) / batches,
            "batch_requests": (after["requests"] - before["requests"]) / batches,
        }
    return results


def run_offline(model: str, store: str, rows: list[tuple[str | None, str]], args: argparse.Namespace) -> float:
    """Rows/s of the same Predictor in a plain loop (1 thread, like the replica)."""
    import pyarrow as pa

    from actors import Predictor

    predictor = Predictor(model=model, adapters=store, task="generate", max_new_tokens=args.max_tokens,
                          num_threads=1)
    table = pa.table({"prompt": [p for _, p in rows], "adapter_id": [a for a, _ in rows]})
    predictor(table.slice(0, args.concurrency))  # warm-up
    started = time.perf_counter()
    for offset in range(0, table.num_rows, args.concurrency):
        predictor(table.slice(offset, args.concurrency))
    return table.num_rows / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    import logging
    import os

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model, store, names = build(Path(tmp), args.adapters)
        patterns = traffic(names, args.requests)
        online = run_online(model, store, patterns, args)
        offline = {name: run_offline(model, store, rows, args) for name, rows in patterns.items()}
    print(f"\n{args.requests} requests x 1 prompt, {args.max_tokens} new tokens (greedy), concurrency "
          f"{args.concurrency} (= max_batch_size), batch_wait_timeout_s {args.batch_wait_timeout_s}, "
          f"{args.adapters} adapters; replica: 1 CPU, 1 torch thread; offline: the same Predictor, 1 thread, "
          f"batches of {args.concurrency} rows")
    print(f"{'batcher':<12} {'traffic':<7} {'req/s':>6} {'p50 ms':>6} {'p99 ms':>6} {'rows/batch':>10} "
          f"{'req/batch':>9} {'offline rows/s':>14} {'online/offline':>14}")
    for (batcher, name), r in online.items():
        print(f"{batcher:<12} {name:<7} {r['rps']:6.1f} {1000 * r['p50']:6.0f} {1000 * r['p99']:6.0f} "
              f"{r['batch_rows']:10.1f} {r['batch_requests']:9.1f} {offline[name]:14.1f} "
              f"{r['rps'] / offline[name]:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
