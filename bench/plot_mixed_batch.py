"""Plot `bench/mixed_batch.py --json` figures: cost of a mixed batch relative to the bare
base model, against the number of distinct adapters in it (ours, PEFT's own mixed batch,
the base at 1.0, and the estimated floor of reading the distinct adapters' weights each
forward pass at the measured memory bandwidth), one panel per max_new_tokens.

    .venv/bin/python bench/mixed_batch.py --reps 3 --new-tokens 1 16 --json bench/mixed_batch.json
    .venv/bin/python bench/plot_mixed_batch.py bench/mixed_batch.json bench/mixed_batch.png

Needs matplotlib (`make bench` installs the project's `bench` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    source, target = (argv if argv is not None else sys.argv[1:])[:2]
    data = json.loads(Path(source).read_text())
    results = data["results"]
    tokens = sorted({r["new_tokens"] for r in results})
    figure, axes = plt.subplots(1, len(tokens), figsize=(4.2 * len(tokens), 3.6), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], tokens):
        rows = sorted((r for r in results if r["new_tokens"] == t), key=lambda r: r["adapters"])
        ks = [r["adapters"] for r in rows]
        ax.plot(ks, [1.0] * len(ks), "k--", label="base model alone")
        ax.plot(ks, [r["ours_s"] / r["base_s"] for r in rows], "o-", label="Switchyard")
        if all("floor_s" in r for r in rows):
            ax.plot(ks, [r["floor_s"] / r["base_s"] for r in rows], ":", color="grey",
                    label="base + reading the adapters each step")
        if all("peft_s" in r for r in rows):
            ax.plot(ks, [r["peft_s"] / r["base_s"] for r in rows], "s-", label="PEFT adapter_names")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_title(f"max_new_tokens {t}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("time / base model's time")
    axes[0][0].legend()
    figure.suptitle(f"Mixed-batch cost, bench Llama, median of {data['reps']} reps, {data['threads']} CPU threads",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
