"""Mixed-batch cost relative to the bare base model (docs/contract.md "Performance").

For k = 1, 8, 32, 64 distinct adapters per batch and each --new-tokens count (default 1: the
prefill; 16 and 64 add decoding steps): max(32, k) rows of 64 tokens through
  - base:  transformers' generate(max_new_tokens=t) with the bare base model,
  - ours:  Predictor(task="generate"), max_new_tokens=t per row (mixed batch, routed layers),
  - peft:  PEFT's own mixed batch, generate(adapter_names=...),
tokenizing and decoding included, on a small Llama (hidden 256, 4 layers, LoRA r=16 on all
linear layers). Repetitions are interleaved and the median of each is used, so the ratios
are measured side by side in one run.

The `floor` column is an estimate, not a timing: the base's time plus the time this machine
takes to read the batch's distinct adapters (their A and B, in bytes) once per forward pass
(t passes for t new tokens) at the memory read bandwidth measured in the same run. Any exact
unmerged mixed batch reads those bytes each step; where they do not fit in cache the ratio
cannot go below it.

    .venv/bin/python bench/mixed_batch.py [--reps 7] [--threads 2] [--new-tokens 1 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COUNTS = (1, 8, 32, 64)


def build(root: Path, n_adapters: int) -> tuple[str, str]:
    """The benchmark model folder and a store of `n_adapters` LoRA r=16 adapters."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from testkit.adapters import save_adapter
    from testkit.models import llama_tokenizer

    tokenizer = llama_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, intermediate_size=1024,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    for i in range(n_adapters):
        save_adapter(str(model_dir), root / "store", f"a{i:02d}", lora, model_class=AutoModelForCausalLM, seed=i)
    return str(model_dir), str(root / "store")


def prompts(tokenizer, n: int) -> list[str]:
    """`n` prompts of 64 tokens (BOS included)."""
    gen = torch.Generator().manual_seed(1)
    specials = set(tokenizer.all_special_ids)
    out = []
    while len(out) < n:
        ids = [t for t in torch.randint(0, len(tokenizer), (200,), generator=gen).tolist() if t not in specials]
        text = tokenizer.decode(ids[:63])
        ids = tokenizer(text)["input_ids"][:64]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def run_base(model, tokenizer, texts: list[str], new_tokens: int = 1) -> None:
    """transformers' own generate on the bare base model, tokenizing and decoding included."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run_peft(model, tokenizer, texts: list[str], names: list[str], new_tokens: int = 1) -> None:
    """PEFT's mixed batch (adapter_names), tokenizing and decoding included."""
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, adapter_names=names,
                         pad_token_id=tokenizer.pad_token_id)
    tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def read_bandwidth() -> float:
    """Bytes per second this machine reads from memory with torch's threads: the best of five
    sums over 400 MB (far more than the last-level cache)."""
    x = torch.ones(100_000_000)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def adapter_bytes(store: str, names: list[str], dtype: torch.dtype) -> int:
    """Bytes of the low-rank weights of the adapters `names` in `store`, held in `dtype`."""
    from safetensors import safe_open

    count = 0
    for name in names:
        with safe_open(f"{store}/{name}/adapter_model.safetensors", "pt") as f:
            count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return count * dtype.itemsize


def timed(fn) -> float:
    """Seconds of one call."""
    start = time.perf_counter()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args.add_argument("--reps", type=int, default=7)
    args.add_argument("--threads", type=int, default=2)
    args.add_argument("--skip-peft", action="store_true", help="only base vs ours")
    args.add_argument("--new-tokens", type=int, nargs="+", default=[1], help="max_new_tokens columns: 1 is the "
                      "prefill's cost; 16 and 64 add decoding (e.g. --new-tokens 1 16 64)")
    args.add_argument("--json", help="also write the medians to this JSON file (bench/plot_mixed_batch.py plots it)")
    opts = args.parse_args()
    torch.set_num_threads(opts.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors import Predictor

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(Path(tmp), max(COUNTS))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        ours = Predictor(model=model_dir, adapters=store, task="generate", max_new_tokens=1, canary=False)
        peft = None
        if not opts.skip_peft:
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), f"{store}/a00",
                                             adapter_name="a00").eval()
            for name in ours.adapter_ids[1:]:
                peft.load_adapter(f"{store}/{name}", adapter_name=name)
        bandwidth = read_bandwidth()
        print(f"torch threads {torch.get_num_threads()}, {opts.reps} interleaved reps, median seconds per batch; "
              f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
        print(f"{'adapters':>8} {'rows':>5} {'new tokens':>10} {'base s':>8} {'ours/base':>10} {'peft/base':>10} "
              f"{'floor/base':>10}")
        results = []
        for k, t in [(k, t) for k in COUNTS for t in opts.new_tokens]:
            n = max(32, k)
            texts = prompts(tokenizer, n)
            names = [ours.adapter_ids[i % k] for i in range(n)]
            table = pa.table({"prompt": texts, "adapter_id": names, "max_new_tokens": [t] * n})
            runs = {"base": lambda: run_base(base, tokenizer, texts, t), "ours": lambda: ours(table)}
            if peft is not None:
                runs["peft"] = lambda: run_peft(peft, tokenizer, texts, names, t)
            for fn in runs.values():  # warm-up
                timed(fn)
            times = {key: [] for key in runs}
            for _ in range(opts.reps):
                for key, fn in runs.items():
                    times[key].append(timed(fn))
            med = {key: statistics.median(v) for key, v in times.items()}
            floor = med["base"] + t * adapter_bytes(store, ours.adapter_ids[:k], base.dtype) / bandwidth
            peft_ratio = f"{med['peft'] / med['base']:10.2f}" if "peft" in med else f"{'-':>10}"
            print(f"{k:>8} {n:>5} {t:>10} {med['base']:8.3f} {med['ours'] / med['base']:10.2f} {peft_ratio} "
                  f"{floor / med['base']:10.2f}")
            results.append({"adapters": k, "rows": n, "new_tokens": t, "floor_s": floor,
                            **{f"{key}_s": v for key, v in med.items()}})
        if opts.json:
            import json

            Path(opts.json).write_text(json.dumps({"reps": opts.reps, "threads": opts.threads,
                                                   "read_bandwidth_gb_s": bandwidth / 1e9, "results": results},
                                                  indent=1))


if __name__ == "__main__":
    main()
