"""How task embed pools, read from a model folder saved by sentence-transformers (cheap: JSON
only, no torch), so that an embedding equals what sentence-transformers gives for the folder.

sentence-transformers describes its pipeline in `modules.json`: a Transformer (the Hugging
Face model in the folder itself), a Pooling module (its `config.json` names the modes) and
optionally a Normalize module. Switchyard reproduces exactly those three; any other module
(Dense, LayerNorm, ...) is refused. A folder without `modules.json` is mean-pooled and not
normalized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.config import POOLINGS

MODULES_FILE = "modules.json"
TRANSFORMER_FILE = "sentence_bert_config.json"
MODEL_FILE = "config_sentence_transformers.json"
# sentence-transformers' boolean pooling keys, in the order its Pooling concatenates them.
LEGACY_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The module sequences Switchyard reproduces (class names; sentence-transformers 2-5 write
# `sentence_transformers.models.Pooling`, 6 writes `...sentence_transformer.modules.pooling.Pooling`).
SEQUENCES = (("Transformer",), ("Transformer", "Pooling"), ("Transformer", "Pooling", "Normalize"))


@dataclass(frozen=True)
class EmbeddingSpec:
    """How one embedding is made from the last hidden state.

    Args:
        modes: pooling modes (POOLINGS names), concatenated in this order.
        normalize: unit length after pooling.
        max_length: sentence-transformers' `max_seq_length` (it truncates longer inputs), or None.
        source: where the pooling was read from, for the log.
    """

    modes: tuple[str, ...]
    normalize: bool
    max_length: int | None = None
    source: str = "default"


def embedding_spec(folder: str, pooling: str | None = None, normalize: bool | None = None) -> EmbeddingSpec:
    """The folder's pooling and normalization, with the options' overrides.

    Args:
        folder: the model folder.
        pooling: one of POOLINGS, or None for what the folder's files say (mean without them).
        normalize: True/False, or None for what the folder's files say (off without them).

    Returns:
        The spec the embed task pools with.

    Raises:
        ValueError: unreadable sentence-transformers files, a module Switchyard cannot
            reproduce, or no Pooling module and no `pooling` override.
    """
    found = read_folder(folder)
    modes = (pooling,) if pooling else found.modes
    if not modes:
        raise ValueError(f"model folder {folder!r}: {MODULES_FILE} lists no Pooling module, so the folder does not "
                         f"say how to pool; pass --pooling (one of {', '.join(POOLINGS)})")
    return EmbeddingSpec(modes, found.normalize if normalize is None else normalize, found.max_length,
                         "--pooling" if pooling else found.source)


def read_folder(folder: str) -> EmbeddingSpec:
    """What the folder's sentence-transformers files say (modes empty: no Pooling module)."""
    root = Path(folder)
    if not (root / MODULES_FILE).is_file():
        return EmbeddingSpec(("mean",), False, None, f"mean, no {MODULES_FILE}")
    paths = dict(_read_modules(root))  # class name -> sub-folder
    transformer = _optional_json(root / TRANSFORMER_FILE)
    _check_transformer(root, paths["Transformer"], transformer)
    _check_model_file(root / MODEL_FILE)
    modes = _pooling_modes(root / paths["Pooling"]) if "Pooling" in paths else ()
    if "Normalize" in paths:
        _check_normalize(root / paths["Normalize"])
    length = transformer.get("max_seq_length")
    source = f"{MODULES_FILE}: {'+'.join(modes) or 'no pooling'}{', Normalize' if 'Normalize' in paths else ''}"
    return EmbeddingSpec(modes, "Normalize" in paths, length if isinstance(length, int) and length > 0 else None,
                         source)


def _read_modules(root: Path) -> list[tuple[str, str]]:
    """(class name, sub-folder) of each module of modules.json, checked against SEQUENCES."""
    entries = _read_json(root / MODULES_FILE, list)
    if not all(isinstance(e, dict) and isinstance(e.get("type"), str) for e in entries):
        raise ValueError(f"{root / MODULES_FILE} is not a list of modules with a 'type'; re-save the model with "
                         "sentence-transformers, or remove the file to get mean pooling")
    modules = [(_module_kind(root, e), str(e.get("path") or "")) for e in entries]
    kinds = tuple(kind for kind, _ in modules)
    if kinds not in SEQUENCES:
        raise ValueError(f"model folder {str(root)!r}: {MODULES_FILE} lists the modules {' -> '.join(kinds)}; "
                         "Switchyard reproduces Transformer -> Pooling -> Normalize (the last two optional) only")
    return modules


def _module_kind(root: Path, entry: dict) -> str:
    """The class name of a sentence-transformers module Switchyard reproduces, else ValueError."""
    kind = entry["type"]
    name = kind.rsplit(".", 1)[-1]
    if kind.startswith("sentence_transformers.") and name in {"Transformer", "Pooling", "Normalize"}:
        return name
    raise ValueError(f"model folder {str(root)!r}: {MODULES_FILE} has the module {kind} (path "
                     f"{entry.get('path')!r}), which Switchyard cannot reproduce (it pools the transformer's output "
                     "and may normalize it, nothing else); embed with sentence-transformers, or use a copy of the "
                     f"folder without {MODULES_FILE} to get plain mean pooling")


def _check_transformer(root: Path, path: str, config: dict) -> None:
    """The Transformer must be the folder's own AutoModel, its last hidden state the token
    embeddings, and its inputs the tokenizer's (no lower-casing of its own)."""
    if path not in ("", "."):
        raise ValueError(f"model folder {str(root)!r}: {MODULES_FILE} loads the transformer from the sub-folder "
                         f"{path!r}; pass that sub-folder as --model (with the Pooling files beside it)")
    modality = config.get("modality_config")  # sentence-transformers 6: which output is the token embeddings
    text = modality.get("text") if isinstance(modality, dict) else None
    output = text.get("method_output_name", "last_hidden_state") if isinstance(text, dict) else "last_hidden_state"
    if config.get("transformer_task", "feature-extraction") != "feature-extraction" or output != "last_hidden_state":
        raise ValueError(f"{root / TRANSFORMER_FILE}: its transformer runs as {config.get('transformer_task')!r} "
                         f"with output {output!r}; Switchyard embeds with AutoModel's last_hidden_state only")
    if config.get("do_lower_case"):
        raise ValueError(f"{root / TRANSFORMER_FILE} sets do_lower_case, so sentence-transformers lower-cases "
                         "every text before tokenizing it and Switchyard does not; lower-case the text column "
                         "and set do_lower_case to false in a copy of the folder")


def _check_model_file(path: Path) -> None:
    """A SentenceTransformer (not a sparse or cross encoder) that adds no prompt by default."""
    config = _optional_json(path)
    if config.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise ValueError(f"{path} describes a {config['model_type']}, not a SentenceTransformer; Switchyard's "
                         "embed reproduces SentenceTransformer folders only")
    if config.get("default_prompt_name"):
        raise ValueError(f"{path} sets default_prompt_name {config['default_prompt_name']!r}, so "
                         "sentence-transformers prepends a prompt to every text and Switchyard does not; put the "
                         "prompt into the text column and remove default_prompt_name from a copy of the folder")


def _pooling_modes(folder: Path) -> tuple[str, ...]:
    """The modes of a Pooling module's config.json, as sentence-transformers reads them: a
    `pooling_mode` string or list, else the boolean `pooling_mode_*` keys (none on: mean)."""
    config = _read_json(folder / "config.json")
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode) if isinstance(mode, list) else (repr(mode),)
    else:
        modes = tuple(m for key, m in LEGACY_MODE_KEYS.items() if config.get(key, False)) or ("mean",)
    unknown = [m for m in modes if m not in POOLINGS]
    if unknown or not modes:
        raise ValueError(f"{folder / 'config.json'} names the pooling {list(modes)}; Switchyard pools with "
                         f"{', '.join(POOLINGS)} (pass --pooling to choose one)")
    return modes


def _check_normalize(folder: Path) -> None:
    """A Normalize module must normalize the sentence embedding (sentence-transformers 6 can
    normalize token embeddings instead)."""
    config = _optional_json(folder / "config.json")
    names = {config.get("module_input_name", "sentence_embedding"), config.get("module_output_name")} - {None}
    if names != {"sentence_embedding"}:
        raise ValueError(f"{folder / 'config.json'}: this Normalize module works on {sorted(names)}, which "
                         "Switchyard cannot reproduce (it normalizes the pooled sentence embedding only)")


def _optional_json(path: Path) -> dict:
    """A JSON object file's value, {} when the file does not exist."""
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path, kind: type = dict) -> Any:
    """A JSON file's value of type `kind` (an object unless told), or ValueError naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); sentence-transformers files must be readable JSON") from e
    if not isinstance(value, kind):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; re-save the model "
                         "with sentence-transformers")
    return value
