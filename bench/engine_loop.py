"""The continuous batcher alone (no Serve, no HTTP): when rows join and leave, side by side.

A closed loop over one `DecodeEngine` (actors/engine.py) on the bench Llama of
bench/mixed_batch.py with 8 LoRA adapters: C clients each send a streamed request, wait for
its final report, and send the next; requests cycle over the 8 adapters and the base model,
prompts of 16-75 characters, max_new_tokens 8-48 (greedy). Two policies on the same
Predictor, runs interleaved:

  - groups:     the engine's defaults (waiting rows join at once while they are at least
                1/JOIN_RATIO of the live rows, else after MAX_HELD_STEPS steps; finished rows
                leave when they are more than DROP_FRACTION of the batch or at a join),
  - every step: rows join at the next step and finished rows leave at once.

Printed per policy and client count, medians over the reps: requests/s, tokens/s, latency
p50/p99, time to first token (the first streamed text) p50/p99, and the seconds the engine
spent in prefills (their merges included), merges and decoding steps. Answers must be equal
across policies, request for request (checked).

    .venv/bin/python bench/engine_loop.py [--clients 1 8 32] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

ADAPTERS = 8


class Timers:
    """Seconds an engine spends in its prefills, merges (`_rebuild`) and decoding steps."""

    def __init__(self, engine) -> None:
        self.seconds = {"prefill": 0.0, "merge": 0.0, "decode": 0.0}
        for name, key in (("_prefill", "prefill"), ("_rebuild", "merge"), ("_decode_one_token", "decode")):
            setattr(engine, name, self._timed(getattr(engine, name), key))

    def _timed(self, method, key):
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return timed


def closed_loop(engine, timers: Timers, clients: int, total: int, texts: list[str]) -> dict:
    """`clients` threads send `total` requests in all, each after its previous answer."""
    from actors.engine import RowRequest

    adapters = [f"a{i:02d}" for i in range(ADAPTERS)] + [None]
    answers, latency, first_token, tokens = {}, [], [], []
    lock, counter = threading.Lock(), iter(range(total))
    before = dict(timers.seconds)

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            done, first, final = threading.Event(), [], {}

            def sink(report: dict) -> None:
                if not first and (report.get("delta") or "final" in report):
                    first.append(time.perf_counter())
                if "final" in report:
                    final.update(report["final"])
                    done.set()

            start = time.perf_counter()
            engine.submit(RowRequest(texts[i % len(texts)], adapters[i % len(adapters)], sink,
                                     {"max_new_tokens": 8 + (i * 5) % 41}, stream=True))
            done.wait()
            latency.append(time.perf_counter() - start)
            first_token.append(first[0] - start)
            tokens.append(final["num_generated_tokens"])
            answers[i] = (final["error"], final["generated_text"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    pct = lambda values, q: sorted(values)[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"req_s": total / wall, "tok_s": sum(tokens) / wall, "p50": pct(latency, 0.5), "p99": pct(latency, 0.99),
            "ttft50": pct(first_token, 0.5), "ttft99": pct(first_token, 0.99), "answers": answers,
            **{key: timers.seconds[key] - before[key] for key in before}}


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args.add_argument("--reps", type=int, default=3)
    args.add_argument("--threads", type=int, default=2)
    args.add_argument("--max-rows", type=int, default=32, help="the engine's capacity (Serve's max_batch_size)")
    opts = args.parse_args()
    torch.set_num_threads(opts.threads)
    from transformers import AutoTokenizer

    from actors import Predictor
    from actors.engine import DecodeEngine
    from mixed_batch import build, prompts

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(Path(tmp), ADAPTERS)
        texts = [text[: 16 + (i * 7) % 60] for i, text in enumerate(prompts(AutoTokenizer.from_pretrained(model_dir),
                                                                           64))]
        predictor = Predictor(model=model_dir, adapters=store, task="generate", max_new_tokens=48, canary=False)
        policies = {"groups": {}, "every step": {"max_held_steps": 0, "drop_fraction": 0.0}}
        engines = {}
        for name, kwargs in policies.items():
            engine = DecodeEngine(predictor, opts.max_rows, **kwargs)
            engines[name] = (engine, Timers(engine))
        closed_loop(*engines["groups"], 4, 8, texts)  # warm-up
        print(f"torch threads {torch.get_num_threads()}, engine capacity {opts.max_rows}, {opts.reps} interleaved "
              "reps, medians")
        print(f"{'policy':>10} {'clients':>7} {'req/s':>6} {'tok/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'TTFT p50':>8} "
              f"{'TTFT p99':>8} {'prefill s':>9} {'merge s':>7} {'decode s':>8}")
        for clients in opts.clients:
            total = max(16, 8 * clients)
            runs: dict[str, list[dict]] = {name: [] for name in policies}
            for _ in range(opts.reps):
                for name in policies:
                    runs[name].append(closed_loop(*engines[name], clients, total, texts))
            answers = [run["answers"] for name in policies for run in runs[name]]
            if any(a != answers[0] for a in answers):
                raise SystemExit(f"answers differ between policies or reps at {clients} clients")
            for name in policies:
                med = {key: statistics.median(run[key] for run in runs[name]) for key in runs[name][0]
                       if key != "answers"}
                print(f"{name:>10} {clients:>7} {med['req_s']:6.2f} {med['tok_s']:6.0f} {med['p50'] * 1e3:7.0f} "
                      f"{med['p99'] * 1e3:7.0f} {med['ttft50'] * 1e3:8.0f} {med['ttft99'] * 1e3:8.0f} "
                      f"{med['prefill']:9.2f} {med['merge']:7.2f} {med['decode']:8.2f}")
        print(f"answers equal across policies and reps ({len(answers)} runs per client count)")


if __name__ == "__main__":
    main()
