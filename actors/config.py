"""Settings of a Predictor, validated at construction. The job's and the server's flags
are built from these fields (snake_case here, kebab-case on the command line)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import pyarrow as pa

TASKS = ("generate", "classify", "embed", "classify-image")
INPUT_COLUMNS = {"generate": "prompt", "classify": "text", "embed": "text", "classify-image": "image"}
MESSAGES = "messages"  # generate's other input column: chat turns ({role, content}), rendered by the chat template
OTHER_INPUT_COLUMNS = {"generate": (MESSAGES,)}  # read instead of INPUT_COLUMNS' when a batch has one
NO_CHAT_TEMPLATE = ("the model's tokenizer has no chat template, so chat turns cannot be rendered: send a prompt, or "
                    "save the tokenizer with a chat_template")
ADAPTER_ID, ADAPTER_IDS, ERROR = "adapter_id", "adapter_ids", "error"
ADAPTER_VERSION = "adapter_version"  # content hash of the adapter files a row ran through
_CLASSIFY = [("label", pa.string()), ("label_id", pa.int64()), ("scores", pa.list_(pa.float32()))]
# Each task's own output columns (docs/contract.md "Columns"), between `adapter_id` and `error`.
TASK_OUTPUTS = {
    "generate": pa.schema([("generated_text", pa.string()), ("num_input_tokens", pa.int64()),
                           ("num_generated_tokens", pa.int64()), ("finish_reason", pa.string())]),
    "classify": pa.schema(_CLASSIFY),
    "embed": pa.schema([("embedding", pa.list_(pa.float32()))]),
    "classify-image": pa.schema(_CLASSIFY),
}
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
# sentence-transformers' pooling modes (its names), for task embed.
POOLINGS = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")
SCORES = ("auto", "logits")


@dataclass
class PredictorConfig:
    """Everything a Predictor needs to load a model and its adapters and run batches.

    Each field's `metadata["help"]` says what it means; it is also the flag's `--help` text
    (`actors/options.py:add_flags`), as PEFT's config dataclasses document their fields.
    """

    model: str = field(metadata={"help": "local Hugging Face model folder."})
    adapters: str | None = field(default=None, metadata={"help": "adapter store folder (None: base model only)."})
    task: str = field(default="generate", metadata={"help": "one of TASKS."})
    device: str = field(default="auto", metadata={
        "help": '"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".'})
    dtype: str = field(default="float32", metadata={"help": "weights and activations dtype."})
    max_new_tokens: int = field(default=64, metadata={
        "help": "task generate: new tokens per row at most (a row's max_new_tokens column, or a request's "
                "max_tokens, overrides it)."})
    temperature: float = field(default=0.0, metadata={
        "help": "task generate: 0 decodes greedily, above 0 samples (a row's temperature column, or a "
                "request's temperature, overrides it)."})
    top_p: float = field(default=1.0, metadata={
        "help": "task generate: nucleus sampling mass when sampling (1: the whole distribution)."})
    seed: int | None = field(default=None, metadata={
        "help": "task generate: sampling seed; each row draws from its own generator seeded by it (None: random)."})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "task generate: a stop string; a row's text ends before the first one it produces."})
    pooling: str | None = field(default=None, metadata={"choices": POOLINGS, "help": (
        "task embed: how the last hidden state is pooled (unset: as the folder's sentence-transformers files "
        "say, else mean).")})
    normalize: bool | None = field(default=None, metadata={"help": (
        "task embed: unit-length embeddings, or not (unset: as the folder's sentence-transformers files say, "
        "else off).")})
    max_loaded_adapters: int | None = field(default=None, metadata={
        "help": "adapters held in memory at once (None: all of the store)."})
    adapter_cache_mb: int = field(default=2048, metadata={"help": (
        "with max_loaded_adapters below the store's size: MiB of host memory for parsed adapter weights "
        "(least recently used dropped first), so an adapter swapped into a slot is copied from memory instead of "
        "read from disk again (0: always read from disk).")})
    canary: bool = field(default=True, metadata={"help": "run the start-up mixed-vs-alone check."})
    lora_modules: list[str] = field(default_factory=list, metadata={"help": (
        "an adapter outside the adapter store, as name=path (vLLM's --lora-modules); rows name it like a store "
        "adapter.")})
    truncate: bool = field(default=False, metadata={"help": (
        "cut text inputs over the model's context (less max_new_tokens; within sentence-transformers' "
        "max_seq_length for embed) on the side the tokenizer's truncation_side names, instead of refusing them "
        "as too_long.")})
    scores: str = field(default="auto", metadata={"choices": SCORES, "help": (
        "tasks classify and classify-image: auto (as transformers' pipelines: softmax, sigmoid or the logits, by "
        "problem_type) or logits (the raw logits).")})
    max_batch_rows: int = field(default=64, metadata={"help": "rows per model call (larger batches are split)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's default)."})

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        require(self.task in TASKS, f"task ({self.task!r}) must be one of {', '.join(TASKS)}")
        require(self.dtype in DTYPES, f"dtype ({self.dtype!r}) must be one of {', '.join(DTYPES)}")
        require(self.scores in SCORES, f"scores ({self.scores!r}) must be one of {', '.join(SCORES)}")
        self.lora_modules = [self.lora_modules] if isinstance(self.lora_modules, str) else list(self.lora_modules or [])
        from actors.store import parse_lora_modules

        parse_lora_modules(self.lora_modules)  # raises ValueError for a bad entry
        require(self.device in DEVICES or str(self.device).startswith("cuda:"),
               f"device ({self.device!r}) must be auto, cpu, cuda or cuda:N")
        require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens ({self.max_new_tokens!r}) must be an integer >= 1")
        require(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0,
                f"temperature ({self.temperature!r}) must be a finite number >= 0")
        require(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
                f"seed ({self.seed!r}) must be an integer in [0, 2**63)")
        require(0 < self.top_p <= 1, f"top_p ({self.top_p!r}) must be in (0, 1]")
        require(self.max_loaded_adapters is None or self.max_loaded_adapters >= 1,
               f"max_loaded_adapters ({self.max_loaded_adapters!r}) must be >= 1")
        require(self.pooling is None or self.pooling in POOLINGS,
                f"pooling ({self.pooling!r}) must be one of {', '.join(POOLINGS)}")
        require(self.normalize is None or isinstance(self.normalize, bool),
                f"normalize ({self.normalize!r}) must be true, false or unset")
        require(isinstance(self.adapter_cache_mb, int) and self.adapter_cache_mb >= 0,
                f"adapter_cache_mb ({self.adapter_cache_mb!r}) must be an integer >= 0")
        require(self.max_batch_rows >= 1, f"max_batch_rows ({self.max_batch_rows!r}) must be >= 1")
        require(all(isinstance(s, str) and s for s in self.stop), f"stop ({self.stop!r}) must be non-empty strings")
        check_model_dir(self.model)
        if self.task == "embed":  # refuse sentence-transformers files it cannot reproduce, up front
            from actors.embedding import embedding_spec

            embedding_spec(self.model, self.pooling, self.normalize)

    @classmethod
    def option_names(cls) -> list[str]:
        """Names of the options (everything but model, adapters and task)."""
        return [f.name for f in fields(cls) if f.name not in ("model", "adapters", "task")]


def fan_out_adapters(named) -> list:
    """The `adapter_id` of each output row of one `adapter_ids` cell: one per named adapter,
    base rows as None however they are named (null, ""), and a null or empty list one base row."""
    return [None if a in (None, "") else a for a in (named or ())] or [None]


def dropped_columns(task: str) -> set[str]:
    """Input columns that do not pass through to the output (`adapter_ids` becomes one
    `adapter_id` per row; image bytes stay behind)."""
    return {ADAPTER_IDS, "image"} if task == "classify-image" else {ADAPTER_IDS}


def added_columns(task: str) -> pa.Schema:
    """The columns every output row gets: `adapter_id`, `adapter_version`, the task's columns, `error`."""
    return pa.schema([pa.field(ADAPTER_ID, pa.string()), pa.field(ADAPTER_VERSION, pa.string()), *TASK_OUTPUTS[task],
                      pa.field(ERROR, pa.string())])


def output_schema(task: str, input_schema: pa.Schema) -> pa.Schema:
    """The output's schema for an input schema: the pass-through columns, then `added_columns`."""
    added = added_columns(task)
    kept = [f for f in input_schema if f.name not in dropped_columns(task) and f.name not in added.names]
    return pa.schema([*kept, *added])


def check_model_dir(model: str) -> None:
    """Refuse a model folder without a readable config.json, with quantized weights or without
    safetensors weights (cheap: no heavy imports).

    Raises:
        ValueError: naming the folder and what to do.
    """
    config = Path(model) / "config.json"
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model folder {model!r} has no readable config.json ({e}); pass --model a local "
                         "Hugging Face model folder") from e
    if not isinstance(settings, dict):
        raise ValueError(f"model folder {model!r} has no readable config.json (it holds a JSON "
                         f"{type(settings).__name__}, not an object); pass --model a local Hugging Face model folder")
    check_not_quantized(model, settings)
    folder = Path(model)
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise ValueError(f"model folder {model!r} has only pickle weights ({pickles[0]}); Switchyard loads "
                         "safetensors only: re-save it with save_pretrained(safe_serialization=True)")
    raise ValueError(f"model folder {model!r} has no *.safetensors weights; save the model with save_pretrained")


def check_not_quantized(model: str, settings: dict) -> None:
    """Refuse a quantized checkpoint (a `quantization_config` in config.json): Switchyard
    supports no quantization method; its routed layers add each row's adapter to plain
    floating-point weights.

    Args:
        model: the model folder (named in the message).
        settings: its config.json.

    Raises:
        ValueError: naming the folder and the quantization method.
    """
    quantization = settings.get("quantization_config")
    if not quantization:
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
    raise ValueError(f"model folder {model!r} is quantized (config.json has a quantization_config, quant_method "
                     f"{method!r}); Switchyard supports no quantization method and runs unquantized weights only: "
                     "pass the unquantized checkpoint, or dequantize it (model.dequantize()) and save it with "
                     "save_pretrained")


def require(ok: bool, message: str) -> None:
    """Raise ValueError(message) unless `ok`."""
    if not ok:
        raise ValueError(message)
