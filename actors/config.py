"""Settings of a Predictor, validated at construction. The job's and the server's flags
are built from these fields (snake_case here, kebab-case on the command line)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

TASKS = ("generate", "classify", "embed", "classify-image")
INPUT_COLUMNS = {"generate": "prompt", "classify": "text", "embed": "text", "classify-image": "image"}
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PredictorConfig:
    """Everything a Predictor needs to load a model and its adapters and run batches.

    Args:
        model: local Hugging Face model folder.
        adapters: adapter store folder (None: base model only).
        task: one of TASKS.
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".
        dtype: weights and activations dtype.
        max_new_tokens, temperature, top_p, seed, stop: generation defaults (task generate).
        normalize: unit-length embeddings (task embed).
        max_loaded_adapters: adapters held in memory at once (None: all of the store).
        canary: run the start-up mixed-vs-alone check.
        max_batch_rows: rows per model call (larger batches are split).
        num_threads: torch CPU threads (None: torch's default).
    """

    model: str
    adapters: str | None = None
    task: str = "generate"
    device: str = "auto"
    dtype: str = "float32"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    normalize: bool = False
    max_loaded_adapters: int | None = None
    canary: bool = True
    max_batch_rows: int = 64
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        require(self.task in TASKS, f"task ({self.task!r}) must be one of {', '.join(TASKS)}")
        require(self.dtype in DTYPES, f"dtype ({self.dtype!r}) must be one of {', '.join(DTYPES)}")
        require(self.device in DEVICES or str(self.device).startswith("cuda:"),
               f"device ({self.device!r}) must be auto, cpu, cuda or cuda:N")
        require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens ({self.max_new_tokens!r}) must be an integer >= 1")
        require(self.temperature >= 0, f"temperature ({self.temperature!r}) must be >= 0")
        require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
                f"seed ({self.seed!r}) must be an integer in [0, 2**63)")
        require(0 < self.top_p <= 1, f"top_p ({self.top_p!r}) must be in (0, 1]")
        require(self.max_loaded_adapters is None or self.max_loaded_adapters >= 1,
               f"max_loaded_adapters ({self.max_loaded_adapters!r}) must be >= 1")
        require(self.max_batch_rows >= 1, f"max_batch_rows ({self.max_batch_rows!r}) must be >= 1")
        require(all(isinstance(s, str) and s for s in self.stop), f"stop ({self.stop!r}) must be non-empty strings")
        check_model_dir(self.model)

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the options (everything but model, adapters and task)."""
        return [f.name for f in fields(cls) if f.name not in ("model", "adapters", "task")]


def check_model_dir(model: str) -> None:
    """Refuse a model folder without a readable config.json or without safetensors weights
    (cheap: no heavy imports)."""
    config = Path(model) / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model folder {model!r} has no readable config.json ({e}); pass --model a local "
                         "Hugging Face model folder") from e
    folder = Path(model)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise ValueError(f"model folder {model!r} has only pickle weights ({pickles[0]}); Switchyard loads "
                         "safetensors only: re-save it with save_pretrained(safe_serialization=True)")
    raise ValueError(f"model folder {model!r} has no *.safetensors weights; save the model with save_pretrained")


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`."""
    if not ok:
        raise ValueError(message)
