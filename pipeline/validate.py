"""Validate stage: everything that can be checked before any model work. Each check raises
ValueError with one line that says what is wrong and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from actors.config import INPUT_COLUMNS, MESSAGES, NO_CHAT_TEMPLATE, OTHER_INPUT_COLUMNS, PredictorConfig
from actors.store import AdapterStore, parse_lora_modules
from pipeline.config import JobConfig, column_flag
from pipeline.paths import check_not_overlapping
from pipeline.read import InputFiles


def required_columns(task: str, schema: pa.Schema | None = None) -> list[str]:
    """The columns the task reads (besides the optional adapter columns): another input column
    of the task (generate's `messages`) when the input has it instead of the task's own."""
    others = [c for c in OTHER_INPUT_COLUMNS.get(task, ()) if schema is not None and c in schema.names]
    return others[:1] if others and INPUT_COLUMNS[task] not in schema.names else [INPUT_COLUMNS[task]]


def validate_job(config: JobConfig, input_files: InputFiles) -> list[str]:
    """The cheap up-front checks: options, model folder, adapter store listing, input schema,
    where the output goes; returns the adapter ids (`validate_adapters` reads them).

    Raises:
        ValueError: the first problem found.
    """
    PredictorConfig(**config.predictor_kwargs())  # every model option, as each actor will check it
    check_processor_files(config.model, config.task)
    adapter_ids = AdapterStore(config.adapters, lora_modules(config)).ids()
    renames = column_renames(config, input_files.schema)
    validate_columns(config.task, renamed(input_files.schema, renames))
    reads = required_columns(config.task, renamed(input_files.schema, renames))
    if reads == [MESSAGES]:
        check_chat_template(config.model)
    for path, schema in zip(input_files.files, input_files.file_schemas):
        missing = [c for c in reads if c not in renamed(schema, renames).names]
        if missing:
            raise ValueError(f"input file {path!r} has no {missing[0]!r} column, which task {config.task!r} reads")
    check_not_overlapping(config.output, {"input": config.input, "model folder": config.model,
                                          "adapter store": config.adapters})
    return adapter_ids


def validate_adapters(config: JobConfig) -> list[str]:
    """Every adapter of the store as the actors will read it, on a meta-device copy of the
    base (the costliest up-front check: it imports torch and transformers, so it runs last).

    Returns:
        The adapter ids.

    Raises:
        ValueError: one line naming the first bad adapter.
    """
    modules = lora_modules(config)
    if not config.adapters and not modules:
        return []
    from actors.validation import validate_store

    return validate_store(config.model, config.adapters, config.task, values=not config.quick_adapter_check,
                          modules=modules)


def lora_modules(config: JobConfig) -> dict[str, str]:
    """The adapters given outside the store (`--lora-modules name=path`), by name."""
    return parse_lora_modules(config.options.get("lora_modules"))


def check_processor_files(model: str, task: str) -> None:
    """The model folder has what turns inputs into tensors: a tokenizer, or for images an
    image processor config."""
    folder = Path(model)
    if task == "classify-image":
        wanted = ["preprocessor_config.json"]
    else:
        wanted = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json"]
    if not any((folder / name).is_file() for name in wanted):
        raise ValueError(f"model folder {model!r} has none of {', '.join(wanted)}, which task {task!r} needs; "
                         "save the tokenizer or image processor with the model (save_pretrained)")


def column_renames(config: JobConfig, schema: pa.Schema) -> dict[str, str]:
    """Input column -> the name the job reads it by, for `--prompt-column` (and the text and
    image ones) and `--adapter-column` (a string column becomes adapter_id, a list column
    adapter_ids).

    Raises:
        ValueError: a named column the input lacks, or one that would clash with a column of
            the input that already has the name it is read by.
    """
    renames = {}
    wanted, given = INPUT_COLUMNS[config.task], config.input_column
    if given != wanted:
        flag = column_flag(config.task)
        if given not in schema.names:
            raise ValueError(f"input has no {given!r} column ({flag}); its columns: {', '.join(schema.names)}")
        if wanted in schema.names:
            raise ValueError(f"input has both {given!r} ({flag}) and {wanted!r} columns; drop or rename {wanted!r}")
        renames[given] = wanted
    name = config.adapter_column
    if name:
        if name not in schema.names:
            raise ValueError(f"input has no {name!r} column (--adapter-column); its columns: {', '.join(schema.names)}")
        kind = schema.field(name).type
        target = "adapter_ids" if pa.types.is_list(kind) or pa.types.is_large_list(kind) else "adapter_id"
        clash = [c for c in ("adapter_id", "adapter_ids") if c in schema.names and c != name]
        if clash:
            raise ValueError(f"input has both {name!r} (--adapter-column) and {clash[0]!r} columns; keep one of them")
        if name != target:
            renames[name] = target
    return renames


def renamed(schema: pa.Schema, renames: dict[str, str]) -> pa.Schema:
    """`schema` with its columns renamed by `renames` (old -> new)."""
    return pa.schema([field.with_name(renames.get(field.name, field.name)) for field in schema])


def check_chat_template(model: str) -> None:
    """A `messages` input needs the tokenizer's chat template (in tokenizer_config.json or a
    chat_template file beside it)."""
    folder = Path(model)
    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        settings = {}
    if not settings.get("chat_template"):
        raise ValueError(f"input has a {MESSAGES!r} column but model folder {model!r}: {NO_CHAT_TEMPLATE}")


def validate_columns(task: str, schema: pa.Schema) -> None:
    """The input has the task's columns and at most one adapter column of the right type."""
    names = set(schema.names)
    given = [c for c in (INPUT_COLUMNS[task], *OTHER_INPUT_COLUMNS.get(task, ())) if c in names]
    if len(given) > 1:
        raise ValueError(f"input has both {given[0]!r} and {given[1]!r} columns; task {task!r} reads one of them: drop "
                         "the other")
    missing = [c for c in required_columns(task, schema) if c not in names]
    if missing:
        raise ValueError(f"input has no {', '.join(repr(c) for c in missing)} column, which task {task!r} reads "
                         f"(columns: {', '.join(sorted(names))})")
    if "adapter_id" in names and "adapter_ids" in names:
        raise ValueError("input has both 'adapter_id' and 'adapter_ids' columns; keep one of them")
    if "adapter_ids" in names and not pa.types.is_list(schema.field("adapter_ids").type) \
            and not pa.types.is_large_list(schema.field("adapter_ids").type):
        raise ValueError(f"column 'adapter_ids' must be a list of strings, not {schema.field('adapter_ids').type}")
