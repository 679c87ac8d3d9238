"""What the low-rank terms alone add to one decoding step of a mixed batch, without routing.

bench/mixed_batch.py times whole calls. This script isolates the arithmetic any exact
unmerged mixed batch must add to each decoding step, on the same bench Llama (hidden 256,
intermediate 1024, 4 layers, LoRA r=16 on all seven linear layers): for k = 1, 8, 32, 64
distinct adapters and max(32, k) rows (one token each, rows grouped by adapter as
Switchyard lays them out), per step:

  - step:       the bare base model's decoding step in transformers' `generate` (a 64-token
                prompt: (time of 17 new tokens - time of 1) / 16),
  - linears:    the 28 base linear layers alone, on the model's own weights,
  - +low-rank:  the same 28 layers each followed by its low-rank pair, the torch calls
                Switchyard's routed layer makes for that layout (`addmm_` for one adapter,
                `bmm` + `baddbmm_` per adapter group), with the adapters' real A and B,
  - low-rank:   the low-rank pairs alone,
  - read:       the bytes of the k adapters' A and B at the memory read bandwidth measured here.

`best ratio` = (step + (+low-rank - linears)) / step: the decoding step's cost relative to
the base if routing, gathering and everything else cost nothing. Repetitions are interleaved
and medians used.

    .venv/bin/python bench/decode_floor.py [--reps 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

COUNTS = (1, 8, 32, 64)


def lowrank_weights(store: str, names: list[str], modules: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per module: A [k, in, r] and B [k, r, out] of the adapters `names` (scaling folded into
    B), stacked in that order as a call's plan holds them."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    weights = [load_file(f"{store}/{name}/adapter_model.safetensors") for name in names]
    scales = [PeftConfig.from_pretrained(f"{store}/{name}") for name in names]
    scales = [config.lora_alpha / config.r for config in scales]
    out = []
    for module in modules:
        key = f"base_model.model.{module}"
        A = torch.stack([w[f"{key}.lora_A.weight"].t() for w in weights]).contiguous()
        B = torch.stack([w[f"{key}.lora_B.weight"].t() * s for w, s in zip(weights, scales)]).contiguous()
        out.append((A, B))
    return out


def step_seconds(model, tokenizer, texts: list[str], reps: int) -> float:
    """The base model's decoding step in transformers' generate: (17 new tokens - 1) / 16."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)

    def run(t: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=t, min_new_tokens=t, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    run(17)
    long, short = [], []
    for _ in range(reps):
        long.append(run(17))
        short.append(run(1))
    return (statistics.median(long) - statistics.median(short)) / 16


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--reps", type=int, default=9)
    args.add_argument("--threads", type=int, default=2)
    opts = args.parse_args()
    torch.set_num_threads(opts.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixed_batch import TARGETS, build, prompts, read_bandwidth

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(Path(tmp), max(COUNTS))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        modules = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
        layers = dict(model.named_modules())
        W = [layers[name].weight for name in modules]
        names = sorted(p.name for p in Path(store).iterdir())
        bandwidth = read_bandwidth()
        rows = {max(32, k) for k in COUNTS}
        steps = {n: step_seconds(model, tokenizer, prompts(tokenizer, n), opts.reps) for n in rows}
        print(f"torch threads {torch.get_num_threads()}, {opts.reps} interleaved reps, median ms per decoding step; "
              f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s; {len(modules)} adapted layers")
        print(f"{'adapters':>8} {'rows':>5} {'step':>7} {'linears':>8} {'+low-rank':>10} {'low-rank':>9} "
              f"{'read':>6} {'best ratio':>10}")
        for k in COUNTS:
            n = max(32, k)
            m = n // k
            pairs = lowrank_weights(store, names[:k], modules)
            gen = torch.Generator().manual_seed(k)
            X = [torch.randn(n, w.shape[1], generator=gen) for w in W]

            def linears() -> None:
                for w, x in zip(W, X):
                    torch.nn.functional.linear(x, w)

            def lowrank(out: torch.Tensor | None, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
                if k == 1:
                    h = x @ A[0]
                    if out is None:
                        h @ B[0]
                    else:
                        out.addmm_(h, B[0])
                else:
                    h = torch.bmm(x.view(k, m, -1), A)
                    if out is None:
                        torch.bmm(h, B)
                    else:
                        out.view(k, m, -1).baddbmm_(h, B)

            def both() -> None:
                for w, x, (A, B) in zip(W, X, pairs):
                    lowrank(torch.nn.functional.linear(x, w), x, A, B)

            def alone() -> None:
                for x, (A, B) in zip(X, pairs):
                    lowrank(None, x, A, B)

            runs = {"linears": linears, "both": both, "alone": alone}
            times: dict[str, list[float]] = {key: [] for key in runs}
            with torch.inference_mode():
                for fn in runs.values():
                    fn()
                for _ in range(opts.reps):
                    for key, fn in runs.items():
                        start = time.perf_counter()
                        for _ in range(10):
                            fn()
                        times[key].append((time.perf_counter() - start) / 10)
            med = {key: statistics.median(v) for key, v in times.items()}
            read = sum(A.nbytes + B.nbytes for A, B in pairs) / bandwidth
            step = steps[n]
            best = (step + med["both"] - med["linears"]) / step
            print(f"{k:>8} {n:>5} {step * 1e3:7.2f} {med['linears'] * 1e3:8.2f} {med['both'] * 1e3:10.2f} "
                  f"{med['alone'] * 1e3:9.2f} {read * 1e3:6.2f} {best:10.2f}")


if __name__ == "__main__":
    main()
