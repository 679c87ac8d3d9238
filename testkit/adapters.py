"""Build real, seeded PEFT adapters whose weights visibly change a base model's outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model

from testkit.models import make_readable

# Standard deviations of the seeded N(0, std) draws, by parameter-name fragment (first match wins).
# Chosen so each tuner moves the tiny models' logits by roughly 20-60% (relative L2), never NaN.
FRESH_STD: tuple[tuple[str, float], ...] = (
    ("vera_lambda_", 0.5),
    ("hada_", 0.2),
    ("lokr_", 0.06),
    ("oft_", 0.05),
    ("lora_E", 1.0),  # AdaLoRA's singular values: their scale is what LoRA's lora_B carries
    ("lora_", 0.06),
    ("prompt", 0.1),
)
SET_FIELDS = ("target_modules", "feedforward_modules", "exclude_modules")
SCALE_VECTOR_KEYS = ("ia3_l", "lora_magnitude_vector", "boft_s")  # multiplicative: drawn around their init
SCALE_VECTOR_STD = 0.2
HEAD_NOISE_RATIO = 0.5
MIN_NOISE_STD = 0.02
DEFAULT_STD = 0.05


def _randn_like(param: torch.Tensor, gen: torch.Generator, std: float) -> torch.Tensor:
    """Return seeded N(0, std) noise shaped like ``param`` (drawn on CPU in float32)."""
    noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
    return noise.to(device=param.device, dtype=param.dtype)


def _perturb(param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Return ``param`` plus noise scaled to its own spread (for copied heads and biases)."""
    spread = float(param.detach().float().std()) if param.numel() > 1 else 0.0
    return param + _randn_like(param, gen, max(HEAD_NOISE_RATIO * spread, MIN_NOISE_STD))


def _new_value(name: str, param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Return the seeded replacement value of one trainable adapter parameter."""
    if any(key in name for key in SCALE_VECTOR_KEYS):
        return param * (1.0 + _randn_like(param, gen, SCALE_VECTOR_STD))
    if "modules_to_save" in name or name.endswith("bias"):
        return _perturb(param, gen)
    std = next((s for key, s in FRESH_STD if key in name), DEFAULT_STD)
    return _randn_like(param, gen, std)


def randomize_adapter(model: PeftModel, *, seed: int = 0) -> list[str]:
    """Re-initialise every trainable adapter parameter with seeded non-zero values; return names."""
    gen = torch.Generator().manual_seed(seed)
    names: list[str] = []
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.requires_grad:
                param.copy_(_new_value(name, param, gen))
                names.append(name)
    return names


def _sort_set_fields(adapter_dir: Path) -> None:
    """Sort set-valued fields of adapter_config.json so saved files are byte-identical per seed."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key in SET_FIELDS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_adapter(
    model_dir: str | Path,
    store_dir: str | Path,
    name: str,
    peft_config: PeftConfig,
    *,
    model_class: Any,
    seed: int = 0,
    save_embedding_layers: bool | str = False,
) -> str:
    """Apply ``peft_config`` to the model in ``model_dir``, randomise it, save to ``store_dir/name``."""
    torch.manual_seed(seed)
    base = model_class.from_pretrained(str(model_dir))
    model = get_peft_model(base, copy.deepcopy(peft_config))
    randomize_adapter(model, seed=seed)
    out = Path(store_dir) / name
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=save_embedding_layers)
    _sort_set_fields(out)
    make_readable(out)
    return str(out)
