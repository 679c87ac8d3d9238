"""Built-in demo assets: a small Llama, an adapter store (LoRA of several ranks and targets,
rsLoRA, LoRA on embeddings and lm_head, VeRA, DoRA, IA3, OFT, prompt tuning, prefix tuning)
and a Parquet file of
mixed-adapter rows (base rows, a fan-out row, an unknown adapter id)."""

from __future__ import annotations

from pathlib import Path

ADAPTERS = ("support-bot", "legal-summarizer", "pirate-speak", "vera-poet", "dora-tutor", "ia3-formal", "oft-editor",
            "prompt-critic", "prefix-greeter")


def build_demo(root: str | Path, rows: int = 240) -> dict[str, str]:
    """Build (or reuse) the demo model, store and input under `root`; returns their paths."""
    root = Path(root)
    paths = {"model": root / "model", "adapters": root / "adapters", "input": root / "input.parquet"}
    if not (paths["model"] / "config.json").exists():
        _build_model_and_store(paths["model"], paths["adapters"])
    if not paths["input"].exists():
        _write_input(paths["input"], rows)
    return {k: str(v) for k, v in paths.items()}


def _build_model_and_store(model_dir: Path, store: Path) -> None:
    """The model folder and nine adapters of different kinds."""
    from peft import IA3Config, LoraConfig, OFTConfig, PrefixTuningConfig, PromptTuningConfig, VeraConfig
    from transformers import AutoModelForCausalLM

    from testkit.adapters import save_adapter
    from testkit.models import build_llama

    build_llama(model_dir)
    configs = {
        "support-bot": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "legal-summarizer": LoraConfig(r=16, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "pirate-speak": LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head"],
                                   init_lora_weights=False),
        "vera-poet": VeraConfig(r=16, target_modules=["q_proj", "up_proj", "down_proj"]),
        "dora-tutor": LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"],
                                 init_lora_weights=False),
        "ia3-formal": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "oft-editor": OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "up_proj"]),
        "prompt-critic": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "prefix-greeter": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    }
    for seed, (name, config) in enumerate(configs.items(), start=1):
        save_adapter(model_dir, store, name, config, model_class=AutoModelForCausalLM, seed=seed)


def _write_input(path: Path, rows: int) -> None:
    """Rows cycling through the adapters and base rows, plus one fan-out and one unknown id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from testkit.data import SENTENCES

    cycle = [[a] for a in ADAPTERS] + [[], None]
    adapter_ids = [cycle[i % len(cycle)] for i in range(rows)]
    adapter_ids[1] = list(ADAPTERS[:3])  # fan-out: one row, three adapters
    adapter_ids[2] = ["no-such-adapter"]
    table = pa.table({
        "request_id": list(range(rows)),
        "prompt": [SENTENCES[i % len(SENTENCES)] for i in range(rows)],
        "adapter_ids": pa.array(adapter_ids, type=pa.list_(pa.string())),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
