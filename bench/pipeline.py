"""End-to-end job throughput vs the same Predictor in a plain loop (docs/contract.md "Performance").

Builds a BERT encoder (hidden 256, 4 layers) with 8 LoRA adapters and N rows (default
30,000) of mixed-adapter texts, then in one run:
  - loop: `Predictor(task="embed")` called on batches of --batch-size in one process,
  - job:  the batch job (read -> Predictor actor pool -> write Parquet) on a local Ray,
          wall time from submission to the last file written, actor start-up included,
with the same total CPU threads (2). Prints rows/s of both and their ratio (target >= 0.8).
The job pays a fixed start-up (worker processes importing torch and transformers, about
6 s on 2 cores) that the loop does not; more rows amortise it.

    .venv/bin/python bench/pipeline.py [--rows 30000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def build(root: Path, rows: int) -> tuple[str, str, Path]:
    """Model folder, adapter store and a Parquet input of `rows` rows."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModel, BertConfig, BertModel

    from testkit.adapters import save_adapter
    from testkit.data import SENTENCES
    from testkit.models import bert_tokenizer

    tokenizer = bert_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        intermediate_size=1024, max_position_embeddings=512)
    model_dir = root / "model"
    BertModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    names = [f"adapter-{i}" for i in range(8)]
    for i, name in enumerate(names):
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["query", "key", "value", "dense"],
                          init_lora_weights=False)
        save_adapter(str(model_dir), root / "store", name, lora, model_class=AutoModel, seed=i)
    texts = [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2)) for i in range(rows)]
    adapters = [None if i % 9 == 8 else names[i % 8] for i in range(rows)]
    path = root / "in.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts, "adapter_id": adapters}), path)
    return str(model_dir), str(root / "store"), path


def run_loop(model: str, store: str, path: Path, batch_size: int) -> float:
    """Rows/s of the Predictor over the whole input in a plain loop (model load excluded)."""
    from actors import Predictor

    predictor = Predictor(model=model, adapters=store, task="embed", num_threads=2)
    table = pq.read_table(path)
    start = time.perf_counter()
    for offset in range(0, table.num_rows, batch_size):
        predictor(table.slice(offset, batch_size))
    return table.num_rows / (time.perf_counter() - start)


def run_job(model: str, store: str, path: Path, out: Path, batch_size: int, allocator: str = "system") -> float:
    """Rows/s of the whole job on a local Ray (2 actors x 1 thread, 0.5 CPU each)."""
    import ray

    from pipeline.config import config_from_args
    from pipeline.job import run

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = config_from_args(["--model", model, "--adapters", store, "--task", "embed", "--input", str(path),
                                   "--output", str(out), "--concurrency", "2", "--num-cpus", "0.5",
                                   "--batch-size", str(batch_size), "--allocator", allocator, "--overwrite"])
        summary = run(config)
    finally:
        ray.shutdown()
    return summary.rows_out / summary.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--allocators", nargs="+", default=["system"], choices=["auto", "tcmalloc", "system"],
                        help="run the job once with each --allocator, in turn (e.g. system tcmalloc system tcmalloc)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, store, path = build(Path(tmp), opts.rows)
        loop = run_loop(model, store, path, opts.batch_size)
        jobs = [(a, run_job(model, store, path, Path(tmp) / "out", opts.batch_size, a)) for a in opts.allocators]
    print(f"rows {opts.rows}, batch size {opts.batch_size}, task embed (BERT hidden 256, 4 layers, 8 LoRA adapters)")
    print(f"plain loop: {loop:8.1f} rows/s (one process, 2 torch threads, model load excluded)")
    for allocator, job in jobs:
        print(f"batch job:  {job:8.1f} rows/s (2 actors x 1 thread, actor start-up and Parquet I/O included; "
              f"--allocator {allocator})")
        print(f"job / loop: {job / loop:8.2f}   (target >= 0.8)")


if __name__ == "__main__":
    main()
