"""How long the up-front adapter check takes for a large store (the job's driver and
`jobs/serve.py` run it before Ray starts).

Builds the demo model and its four adapters (LoRA of several ranks and targets, LoRA on the
embeddings and lm_head, VeRA), copies them into a store of `--adapters` folders, and times
`validate_store` with values read and with headers only.

    .venv/bin/python bench/validate_store.py --adapters 1000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters in the store")
    args = parser.parse_args()
    from actors.validation import meta_base, validate_store
    from pipeline.demo import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_demo(Path(tmp) / "demo")
        sources = sorted(Path(paths["adapters"]).iterdir())
        store = Path(tmp) / "store"
        for k in range(args.adapters):
            shutil.copytree(sources[k % len(sources)], store / f"adapter-{k:05d}")
        started = time.perf_counter()
        meta_base(paths["model"], "generate")
        print(f"base model on the meta device: {time.perf_counter() - started:.2f} s")
        for values in (True, False):
            started = time.perf_counter()
            validate_store(paths["model"], str(store), "generate", values=values)
            what = "values read" if values else "headers only"
            print(f"{args.adapters} adapters, {what}: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
