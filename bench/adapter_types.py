"""Cost of each adapter type relative to the bare base model, and of one batch mixing them all.

One store on the bench Llama (hidden 256, 4 layers, every weight type on all seven linear
layers, LoRA-family ranks 16; trainable tokens on 16 token ids, with LoRA r=16 beside them;
prompt tuning with 16 virtual tokens, which every row of a call then attends to (padding);
prefix tuning with 16 prefix positions in every layer). For each
type: 32 rows of 64 tokens, all through that type's adapter; then 32 rows mixing every weight
type and base rows (`weights`), and 32 rows mixing every type and base rows (`mixed`). Each batch is timed side by side, interleaved, median of the reps:
  - base: transformers' generate with the bare base model,
  - ours: Predictor(task="generate") (routed layers),
  - peft: PEFT with only that adapter loaded, its own generate (no mixed batch: PEFT's
          `adapter_names` path ignores or refuses most of these types; none for prompt and
          prefix tuning, whose generate() PEFT 0.21.2 gets wrong on transformers 5),
at max_new_tokens 1 (prefill) and 16 (decode), tokenizing and decoding included.

    .venv/bin/python bench/adapter_types.py [--reps 5] [--threads 2] [--only lora dora ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from bench.mixed_batch import TARGETS, build, prompts, timed  # noqa: E402

ROWS = 32
NEW_TOKENS = (1, 16)
PROMPT_LEARNING = ("prompt", "prefix")


def configs() -> dict:
    """One PEFT config per type, on every linear layer."""
    from peft import (AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig,
                      PrefixTuningConfig, PromptTuningConfig, VeraConfig)

    return {
        "lora": LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False),
        "dora": LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=TARGETS, init_lora_weights=False),
        "tokens": LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False,
                             trainable_token_indices=list(range(10, 26))),
        "vera": VeraConfig(r=16, target_modules=TARGETS),
        "adalora": AdaLoraConfig(init_r=16, lora_alpha=32, target_modules=TARGETS, total_step=10),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=TARGETS),  # rank 16 once folded
        "ia3": IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
        "lokr": LoKrConfig(r=16, alpha=32, target_modules=TARGETS),
        "oft": OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS),
        "boft": BOFTConfig(boft_block_size=32, target_modules=TARGETS),
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    }


def run_base(model, tokenizer, texts: list[str], new: int) -> None:
    """transformers' own generate on the bare base model (or PEFT's on one adapter)."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def measure(runs: dict, reps: int) -> dict[str, float]:
    """Median seconds of each run, interleaved, after one warm-up each."""
    for fn in runs.values():
        timed(fn)
    times = {key: [] for key in runs}
    for _ in range(reps):
        for key, fn in runs.items():
            times[key].append(timed(fn))
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--reps", type=int, default=5)
    args.add_argument("--threads", type=int, default=2)
    args.add_argument("--only", nargs="+", metavar="BATCH", help="run these rows only (e.g. lora dora mixed)")
    opts = args.parse_args()
    torch.set_num_threads(opts.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors import Predictor
    from testkit.adapters import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(Path(tmp), 0)
        for seed, (name, config) in enumerate(configs().items()):
            save_adapter(model_dir, store, name, config, model_class=AutoModelForCausalLM, seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ours = {n: Predictor(model=model_dir, adapters=store, task="generate", max_new_tokens=n, canary=False)
                for n in NEW_TOKENS[:1]}
        for n in NEW_TOKENS[1:]:
            ours[n] = ours[NEW_TOKENS[0]].with_options(max_new_tokens=n)
        texts = prompts(tokenizer, ROWS)
        print(f"torch threads {torch.get_num_threads()}, {ROWS} rows x 64 tokens, {opts.reps} interleaved reps, "
              "medians; ratios to the bare base model's generate")
        print(f"{'batch':>8} " + " ".join(f"{f'ours/base {n}':>13} {f'peft/base {n}':>13}" for n in NEW_TOKENS))
        weights = [n for n in configs() if n not in PROMPT_LEARNING]
        for name in [n for n in [*configs(), "weights", "mixed"] if not opts.only or n in opts.only]:
            if name in ("weights", "mixed", *PROMPT_LEARNING):  # no PEFT column (see the docstring)
                cycle = {"weights": [*weights, None], "mixed": [*configs(), None]}.get(name, [name])
                names, peft = [cycle[i % len(cycle)] for i in range(ROWS)], None
            else:
                names = [name] * ROWS
                peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                                 f"{store}/{name}").eval()
            table = pa.table({"prompt": texts, "adapter_id": names})
            cells = []
            for n in NEW_TOKENS:
                runs = {"base": lambda: run_base(base, tokenizer, texts, n), "ours": lambda: ours[n](table)}
                if peft is not None:
                    runs["peft"] = lambda: run_base(peft, tokenizer, texts, n)
                med = measure(runs, opts.reps)
                peft_ratio = f"{med['peft'] / med['base']:13.2f}" if "peft" in med else f"{'-':>13}"
                cells.append(f"{med['ours'] / med['base']:13.2f} {peft_ratio}")
            print(f"{name:>8} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
