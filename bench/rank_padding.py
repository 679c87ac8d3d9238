"""One large-rank adapter in the store: does it slow the calls that do not use it?

Builds the bench Llama of bench/mixed_batch.py with 8 LoRA adapters r=16 on every linear
layer, and a second store holding the same 8 plus one r=256 adapter. 32 rows over the 8
r=16 adapters (64 tokens each) run through a Predictor of each store, interleaved, median of
--reps; max_new_tokens 1 and 16. Switchyard cuts each call's low-rank stacks to the largest
rank among its rows' adapters, so the ratio should be near 1; without the cut every call
pays for rank 256. Outputs are compared row for row.

    .venv/bin/python bench/rank_padding.py [--reps 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.predictor import Predictor
    from mixed_batch import TARGETS, build, prompts
    from testkit.adapters import save_adapter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, small = build(Path(tmp), 8)
        big = Path(tmp) / "with-big"
        shutil.copytree(small, big)
        save_adapter(model, big, "big", LoraConfig(r=256, lora_alpha=256, target_modules=TARGETS,
                                                   init_lora_weights=False), model_class=AutoModelForCausalLM, seed=99)
        texts = prompts(AutoTokenizer.from_pretrained(model), 32)
        names = sorted(q.name for q in Path(small).iterdir())
        predictors = {name: Predictor(model=model, adapters=str(store), task="generate", canary=False)
                      for name, store in (("r16 store", small), ("r16 + r256 store", big))}
        print(f"torch threads {args.threads}, {args.reps} interleaved reps, 32 rows over 8 r=16 adapters")
        print(f"{'new tokens':>10} {'r16 store s':>12} {'with r256 s':>12} {'ratio':>6} {'equal':>6}")
        for t in (1, 16):
            table = pa.table({"prompt": texts, "adapter_id": [names[i % 8] for i in range(32)],
                              "max_new_tokens": [t] * 32})
            times = {name: [] for name in predictors}
            outs = {}
            for rep in range(args.reps + 1):
                for name, predictor in predictors.items():
                    start = time.perf_counter()
                    outs[name] = predictor(table)
                    if rep:
                        times[name].append(time.perf_counter() - start)
            a, b = (statistics.median(times[n]) for n in predictors)
            same = sum(x == y for x, y in zip(*(o.column("generated_text").to_pylist() for o in outs.values())))
            print(f"{t:>10} {a:12.3f} {b:12.3f} {b / a:6.2f} {same:>4}/32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
