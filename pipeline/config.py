"""The batch job's settings: one dataclass, built from flags and an optional YAML file
(flags win), validated before any model work."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.allocator import ALLOCATORS
from actors.config import DEVICES, DTYPES, INPUT_COLUMNS, TASKS, PredictorConfig, require
from pipeline.cluster import MODES as CLUSTER_MODES
from actors.options import add_flags, field_type

# Predictor options the job passes through: every PredictorConfig option but the thread count,
# which the job derives from --num-cpus.
MODEL_OPTIONS = [name for name in PredictorConfig.option_names() if name != "num_threads"]
COLUMN_FLAGS = {"--prompt-column": ("generate",), "--text-column": ("classify", "embed"),
                "--image-column": ("classify-image",)}  # the flag naming each task's input column


def column_flag(task: str) -> str:
    """The flag that names `task`'s input column under another name (`--prompt-column`, ...)."""
    return next(flag for flag, tasks in COLUMN_FLAGS.items() if task in tasks)


def _flag_field(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


@dataclass
class JobConfig:
    """Everything the batch job needs.

    Args:
        model, adapters, task: the base model folder, the adapter store, the task.
        input, output: Parquet file/folder (local or any pyarrow URI) and output folder.
        batch_size: rows per actor call; concurrency: actors; num_cpus/num_gpus: per actor;
        num_threads: torch threads per actor (default: num_cpus rounded down, at least 1).
        checkpoint_dir, id_column: resume a job that died (pipeline/resume.py): where its state
            is kept, and the input column with a unique id per row.
        overwrite: replace the output folder's files instead of refusing a non-empty one.
        quick_adapter_check: check adapters on the driver from their safetensors headers only
            (the actors still read and check every value).
        cluster_by_adapter: sort rows by adapter before the actor pool (pipeline/cluster.py):
            auto (when the store holds more adapters than --max-loaded-adapters), on, off.
        allocator: the actors' memory allocator (actors/allocator.py): auto, tcmalloc, system.
        options: Predictor options (MODEL_OPTIONS: PredictorConfig's fields).
    """

    model: str
    task: str
    input: str
    output: str
    adapters: str | None = None
    batch_size: int = 64
    concurrency: int = 1
    num_cpus: float | None = None
    num_gpus: float = 0.0
    num_threads: int | None = None
    progress_seconds: float = 30.0
    limit: int | None = None
    rows_per_block: int | None = None
    prompt_column: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    adapter_column: str | None = None
    checkpoint_dir: str | None = None
    id_column: str | None = None
    overwrite: bool = False
    quick_adapter_check: bool = False
    cluster_by_adapter: str = "auto"
    allocator: str = "system"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.task in TASKS, f"--task ({self.task!r}) must be one of {', '.join(TASKS)}")
        require(self.batch_size >= 1, f"--batch-size ({self.batch_size}) must be >= 1")
        require(self.cluster_by_adapter in CLUSTER_MODES,
                f"--cluster-by-adapter ({self.cluster_by_adapter!r}) must be auto, on or off")
        require(self.allocator in ALLOCATORS, f"--allocator ({self.allocator!r}) must be auto, tcmalloc or system")
        require(self.concurrency >= 1, f"--concurrency ({self.concurrency}) must be >= 1")
        require(self.num_gpus >= 0, f"--num-gpus ({self.num_gpus}) must be >= 0")
        require(self.num_cpus is None or self.num_cpus > 0, f"--num-cpus ({self.num_cpus}) must be > 0")
        require(self.num_threads is None or self.num_threads >= 1, f"--num-threads ({self.num_threads}) must be >= 1")
        require(self.progress_seconds >= 0, f"--progress-seconds ({self.progress_seconds}) must be >= 0")
        require(self.limit is None or self.limit >= 1, f"--limit ({self.limit}) must be >= 1")
        require(self.rows_per_block is None or self.rows_per_block >= 1,
                f"--rows-per-block ({self.rows_per_block}) must be >= 1")
        for flag, tasks in COLUMN_FLAGS.items():
            given = getattr(self, _flag_field(flag))
            require(given is None or self.task in tasks, f"{flag} is for task {' or '.join(tasks)}; task "
                    f"{self.task!r} reads its {INPUT_COLUMNS[self.task]!r} column from {column_flag(self.task)}")
        require(self.options.get("dtype", "float32") in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}")
        device = self.options.get("device", "auto")
        require(device in DEVICES or str(device).startswith("cuda:"), f"--device ({device!r}) must be auto, cpu or cuda")

    @property
    def input_column(self) -> str:
        """The input's name for the column the task reads (`--prompt-column`, ...)."""
        return getattr(self, _flag_field(column_flag(self.task))) or INPUT_COLUMNS[self.task]

    @property
    def actor_cpus(self) -> float:
        """CPUs per actor: as given, else 1 with a GPU and 1 on CPU (fractional via --num-cpus)."""
        return self.num_cpus if self.num_cpus is not None else 1.0

    def predictor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Predictor(...)` in each actor."""
        threads = self.num_threads or (max(1, int(self.actor_cpus)) if self.num_gpus == 0 else None)
        return {"model": self.model, "adapters": self.adapters, "task": self.task, "num_threads": threads,
                **self.options}


def build_parser() -> argparse.ArgumentParser:
    """The job's flags; every default is None so that a YAML file can fill what is not given."""
    p = argparse.ArgumentParser(prog="batch_infer.py", description="Switchyard batch inference: Parquet in, "
                                "Parquet out, every row through its own PEFT adapter.")
    p.add_argument("--config", help="YAML file with the same options (snake_case or kebab-case); flags win")
    p.add_argument("--model", help="local Hugging Face model folder")
    p.add_argument("--adapters", help="adapter store: a folder of PEFT adapter folders")
    p.add_argument("--task", metavar="{" + ",".join(TASKS) + "}",  # checked by JobConfig: a one-line error
                   help="what the model does with each row")
    p.add_argument("--input", help="Parquet file or folder (local path, s3://, gs://, ...)")
    p.add_argument("--output", help="output folder for Parquet files (local path, s3://, gs://, ...)")
    p.add_argument("--batch-size", type=int, help="rows per actor call (default 64)")
    p.add_argument("--concurrency", type=int, help="number of model actors (default 1)")
    p.add_argument("--num-cpus", type=float, help="CPUs per actor (default 1; fractions allowed)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (default 0)")
    p.add_argument("--num-threads", type=int, help="torch threads per actor (default: --num-cpus rounded down, at "
                   "least 1; torch's default on GPU actors); more than --num-cpus oversubscribes the CPUs Ray "
                   "reserved for each actor")
    p.add_argument("--progress-seconds", type=float, help="log a progress line this often when stderr is not a "
                   "terminal (default 30; 0: never)")
    p.add_argument("--limit", type=int, help="run the first N input rows only (a sample run)")
    p.add_argument("--rows-per-block", type=int, help="rows per Ray Data block, each written as its own output "
                   "file as soon as it is done (default: the input split across 2 x --concurrency blocks, at most "
                   "max(1000, --batch-size) rows each)")
    p.add_argument("--prompt-column", help="task generate: the input column holding the prompt (default: prompt)")
    p.add_argument("--text-column", help="tasks classify and embed: the input column holding the text (default: "
                   "text)")
    p.add_argument("--image-column", help="task classify-image: the input column holding the image bytes "
                   "(default: image)")
    p.add_argument("--adapter-column", help="the input column naming each row's adapter: a string column as "
                   "adapter_id, a list column as adapter_ids (e.g. model, as Ray Data LLM names it)")
    p.add_argument("--checkpoint-dir", help="folder (local on one machine, s3:// or a shared mount on a cluster) "
                   "where the job records what it has written: rerun the same command after a crash and it writes "
                   "only the rest; needs --id-column")
    p.add_argument("--id-column", help="input column with a unique id per row (integers or strings), by which "
                   "--checkpoint-dir resumes")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace files in a non-empty output "
                   "(and start over instead of resuming from --checkpoint-dir)")
    p.add_argument("--quick-adapter-check", action="store_true", default=None,
                   help="check adapters up front from their safetensors headers only, not every value (NaN/inf); "
                        "the actors still check values when they load them")
    p.add_argument("--cluster-by-adapter", metavar="{auto,on,off}", help="sort rows by adapter before the actors "
                   "(fan-out rows expanded first), so each batch names few adapters: auto (default) does it on GPU "
                   "actors when the store holds more adapters than --max-loaded-adapters and the input has at least "
                   "16 rows per adapter; it reads the whole input before the first batch runs (Ray Data's sort)")
    p.add_argument("--allocator", metavar="{auto,tcmalloc,system}", help="the actors' memory allocator: system "
                   "(default) keeps glibc's malloc, auto preloads tcmalloc when the machine starting the job has it "
                   "installed, tcmalloc requires it (no gain measured on 2 CPU cores: bench/allocator.py)")
    add_flags(p, PredictorConfig, skip={"model", "adapters", "task", "num_threads"})
    return p


def config_from_args(argv: list[str] | None = None) -> JobConfig:
    """Parse flags, merge them over the YAML file, and build a validated JobConfig.

    Raises:
        ValueError: a missing required option, an unreadable config file, or a bad value.
    """
    args = vars(build_parser().parse_args(argv))
    values = _read_yaml(args.pop("config"))
    values.update({k: v for k, v in args.items() if v is not None})
    missing = [f"--{k}" for k in ("model", "task", "input", "output") if not values.get(k)]
    if missing:
        raise ValueError(f"missing required option(s): {', '.join(missing)}")
    job_fields = {f.name for f in dataclasses.fields(JobConfig)} - {"options"}
    unknown = sorted(set(values) - job_fields - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) in the config file: {', '.join(unknown)}")
    values = {k: _coerce(k, v) for k, v in values.items()}
    options = {k: v for k, v in values.items() if k in MODEL_OPTIONS}
    return JobConfig(**{k: v for k, v in values.items() if k in job_fields}, options=options)


def _coerce(name: str, value: Any) -> Any:
    """A config-file value as its option's type (flags are typed by argparse already)."""
    owner = PredictorConfig if name in MODEL_OPTIONS else JobConfig
    kind = field_type(typing.get_type_hints(owner)[name])[0]
    if value is None or kind not in (int, float) or isinstance(value, bool):
        return value
    try:
        converted = kind(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"option {name} ({value!r}) must be {'an integer' if kind is int else 'a number'}") from e
    if kind is int and converted != float(value):
        raise ValueError(f"option {name} ({value!r}) must be an integer")
    return converted


def _read_yaml(path: str | None) -> dict[str, Any]:
    """The YAML config file as a dict with snake_case keys ({} without a file)."""
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config file {path!r}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of options")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
