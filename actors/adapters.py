"""Reading one PEFT adapter folder into the per-module low-rank form the routed layers use.

PEFT reads the config (its `<Type>Config.from_pretrained`) and decides which modules a
config targets (`check_target_module_exists`); the weights are read from safetensors only.
Each adapter type is one kind in `actors/kinds/` (registry `KINDS`, keyed by `peft_type`):
its config class, its option refusals, and how its tensors become, per targeted module,
`delta(x) = x @ A.T @ B.T + bias` with the adapter's scaling folded into `B` and `bias`
(LoRA, VeRA, AdaLoRA, LoHa as an exact rank-r^2 product). This module keeps what every
kind shares: the config and tensor files, heads (`modules_to_save`), target checks.
Anything no kind can route is refused here, naming the adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actors.kinds import (
    DELTA_MARKERS as _DELTA_MARKERS,  # key endings marking one module's weights
)
from actors.kinds import KINDS, kind_of
from actors.kinds.common import (
    PREFIX,
    WEIGHTS_FILE,
    AdapterError,
    ModuleDelta,
    module_dims,
    refuse_leftovers,
)

__all__ = ["KINDS", "PREFIX", "WEIGHTS_FILE", "AdapterError", "AdapterWeights", "BaseTree", "ModuleDelta",
           "module_dims", "peft_modules_to_save", "read_adapter"]

PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
# Heads PEFT's task classes add to `modules_to_save` before matching targets
# (PeftModelForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering).
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class AdapterWeights:
    """Everything one adapter changes: low-rank deltas and whole replacement heads."""

    adapter_id: str
    peft_type: str
    deltas: dict[str, ModuleDelta] = field(default_factory=dict)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    virtual: torch.Tensor | None = None  # [n, d] prompt learning's virtual tokens
    prefix: torch.Tensor | None = None  # [layers * 2, heads, n, head_dim] prefix tuning's keys and values
    id2label: dict[int, str] | None = None  # its own label names (config.json beside it), for classifiers
    version: str | None = None  # content hash of the files it was read from (`adapter_version`)

    @property
    def n_virtual(self) -> int:
        """How many positions its virtual tokens or prefix take in front of a row."""
        if self.virtual is not None:
            return self.virtual.shape[0]
        return 0 if self.prefix is None else self.prefix.shape[2]


class BaseTree:
    """The base model's modules and tensors as they were before any routed layer was installed.

    Routed layers replace children of base modules (a LoRA on `classifier.dense` replaces a
    child of the `classifier` head), so a live module's `state_dict()` would later name the
    wrappers' tensors. Reading every adapter against this snapshot makes the order adapters
    are read in irrelevant.

    Args:
        model: the base model, before the runtime wraps anything.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self._tensors = dict(model.state_dict())  # detached views: no copy

    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        """The untouched `state_dict()` of module `name` (keys relative to it).

        Args:
            name: a dotted module name of the base model.

        Returns:
            Its parameters and persistent buffers, as `module.state_dict()` gave them
            before any wrapping.
        """
        prefix = f"{name}." if name else ""
        return {key[len(prefix):]: value for key, value in self._tensors.items() if key.startswith(prefix)}


def read_adapter(path: Path, adapter_id: str, base: BaseTree, values: bool = True) -> AdapterWeights:
    """Read and validate one adapter against the untouched base model.

    This is the one check every entry point runs: the job's driver and `jobs/serve.py` before
    Ray starts (on a meta-device copy of the base, `values=False` or True), and the Predictor
    in every actor and replica (start-up, `load_adapter`, re-reads after eviction).

    Args:
        path: the adapter folder (inside the store).
        adapter_id: its id, used in every error message.
        base: the base model as it was before any routed layer was installed (its modules
            may live on the meta device: then base weights are not compared).
        values: read the tensors' values (finite checks); False reads only the safetensors
            header and returns meta tensors of the right shapes.

    Returns:
        The adapter's per-module deltas and heads, float32 on the CPU (or meta).

    Raises:
        AdapterError: unsupported type or option, pickle weights, a corrupt file, weights
            that are not finite or do not fit the base model, files that leave the folder.
    """
    config = _read_config(path, adapter_id)
    tensors = _read_tensors(path, adapter_id, values)
    modules = base.modules
    weights = AdapterWeights(adapter_id, config.peft_type.value, version=adapter_version(path) if values else None)
    weights.id2label = _read_labels(path, adapter_id, modules[""])
    kind = kind_of(weights.peft_type, adapter_id)
    if kind.prompt:  # prompt learning: virtual tokens or a prefix, and heads; no module adapted
        if kind.virtual is not None:
            weights.virtual = kind.virtual(tensors, config, modules, adapter_id)
        else:
            weights.prefix = kind.prefix(tensors, config, modules, adapter_id)
        # Its PeftModel has no tuner level, so heads are saved as `base_model.<name>`.
        tensors = {PREFIX + key.removeprefix("base_model."): value for key, value in tensors.items()}
        weights.heads = _take_heads(tensors, config, base, adapter_id)
        refuse_leftovers(tensors, adapter_id)
        return weights
    weights.heads = _take_heads(tensors, config, base, adapter_id)
    _refuse_deltas_inside_heads(tensors, config, adapter_id)
    weights.deltas = kind.deltas(tensors, config, modules, adapter_id)
    _check_targets(weights, config, modules, adapter_id)
    return weights


VERSION_FILES = ("adapter_config.json", WEIGHTS_FILE, "config.json")  # what read_adapter reads
VERSION_CHARS = 12


def adapter_version(path: Path) -> str:
    """A short content hash of an adapter folder's config, weights and label names: the
    `adapter_version` of every row it produced, so that a row traces to the exact files even
    when a folder is replaced between runs.

    Args:
        path: the adapter folder.

    Returns:
        The first 12 hex digits of a SHA-256 over each file of `VERSION_FILES` that exists
        (its name, its size, its bytes), in that order.
    """
    digest = hashlib.sha256()
    for name in VERSION_FILES:
        file = path / name
        if not file.is_file():
            continue
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:VERSION_CHARS]


def _read_labels(path: Path, adapter_id: str, model: nn.Module) -> dict[int, str] | None:
    """An adapter's own label names for a classifier base: `id2label` of a `config.json`
    beside adapter_config.json (what `model.config.save_pretrained(adapter_dir)` writes after
    training on another label set). None when there is none, or the base is no classifier.

    Raises:
        AdapterError: a label map that is not one name per class id, or whose number of
            labels differs from the base model's (the head's shape is the base's).
    """
    from transformers.models.auto import modeling_auto as auto

    file = path / "config.json"
    classifiers = (*auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values(),
                   *auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values())
    if not file.is_file() or type(model).__name__ not in classifiers:
        return None
    try:
        raw = json.loads(file.read_text()).get("id2label")
    except (OSError, ValueError, AttributeError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: cannot read the label names of its config.json: {e}") from e
    if raw is None:
        return None
    n = model.config.num_labels
    try:
        labels = {int(k): v for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        labels = None
    if labels is None or sorted(labels) != list(range(len(labels))) or not all(isinstance(v, str) for v in
                                                                                labels.values()):
        raise AdapterError(f"adapter {adapter_id!r}: id2label in its config.json must map every class id 0..n-1 "
                           "to a name")
    if len(labels) != n:
        raise AdapterError(f"adapter {adapter_id!r}: its config.json names {len(labels)} labels, the base model has "
                           f"{n}; a classify adapter keeps the base's number of labels (its head has the base's "
                           "shape): retrain it on the base's label count, or use a base with its own")
    return labels


def _read_config(path: Path, adapter_id: str):
    """The adapter's PEFT config, parsed by its kind's config class, refusing types (the
    message lists the registered ones) and options we cannot route."""
    if (path / "adapter_config.json").is_symlink():
        _refuse_escape(path / "adapter_config.json", path, adapter_id)
    try:
        raw = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: cannot read adapter_config.json: {e}") from e
    kind = kind_of(raw.get("peft_type") if isinstance(raw, dict) else None, adapter_id)
    try:
        config = kind.parse_config(str(path))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: invalid adapter_config.json: {e}") from e
    kind.refuse(config, adapter_id)
    config.modules_to_save = peft_modules_to_save(config)
    return config


def peft_modules_to_save(config) -> list[str] | None:
    """The `modules_to_save` PEFT loads an adapter with: its config's, plus the heads of its
    `task_type` (PeftModel.from_pretrained picks the task's class, which adds them before it
    matches targets, so no LoRA target inside them is adapted).

    Args:
        config: the adapter's PEFT config.

    Returns:
        The module names, or None when there are none.
    """
    names = list(config.modules_to_save or ())
    task = getattr(config.task_type, "value", config.task_type)
    names += [m for m in _TASK_HEADS.get(task, ()) if m not in names]
    return names or None


def _read_tensors(path: Path, adapter_id: str, values: bool = True) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors only (pickle files are refused); with
    `values=False` meta tensors from the file's header (truncation is still caught: the
    header must cover the whole file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        pickles = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickles:
            raise AdapterError(f"adapter {adapter_id!r} has only pickle weights ({pickles[0]}); Switchyard loads "
                               "safetensors only: re-save it with save_pretrained(safe_serialization=True)")
        raise AdapterError(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}")
    _refuse_escape(file, path, adapter_id)
    try:
        tensors = load_file(str(file)) if values else _header_tensors(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: corrupt {WEIGHTS_FILE}: {e}") from e
    for key, value in sorted(tensors.items()) if values else ():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"adapter {adapter_id!r}: its weights are not finite (NaN or inf in {key}); the "
                               "adapter is broken (e.g. a diverged training run): retrain or re-save it")
    return {key: value.float() for key, value in tensors.items()}


def _refuse_escape(file: Path, folder: Path, adapter_id: str) -> None:
    """Refuse a file that is a link leading outside its adapter folder (store security)."""
    if file.resolve().parent != folder.resolve():
        raise AdapterError(f"adapter {adapter_id!r}: {file.name} links outside the adapter folder (to "
                           f"{str(file.resolve())!r}); adapters are read only from inside the store: copy the file in")


def _header_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Zero tensors with the shapes the safetensors header declares (no data is read); zeros,
    not uninitialised memory, so that the kinds' load-time math (OFT's and BOFT's Cayley
    transforms) runs on defined values."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return {key: torch.zeros(handle.get_slice(key).get_shape(), dtype=torch.float32)
                for key in handle.keys()}


def _take_heads(tensors: dict, config, base: BaseTree, adapter_id: str) -> dict[str, dict]:
    """Pop the whole-module copies (`modules_to_save`) out of `tensors`, keyed by module name.

    PEFT wraps every module whose name ends with an entry of `modules_to_save` and saves its
    copy under the module's own keys (`classifier.dense.weight`, the `modules_to_save.default`
    level stripped); loading needs every one of those keys."""
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for name in [n for n in base.modules if n and any(n.endswith(m) for m in (config.modules_to_save or ()))]:
        expected = base.state_of(name)
        if not expected:  # nothing to copy (a Dropout): the copy computes what the base does
            continue
        state = {param: tensors.pop(f"{PREFIX}{name}.{param}") for param in list(expected)
                 if f"{PREFIX}{name}.{param}" in tensors}
        for param, value in state.items():
            if value.shape != expected[param].shape:
                raise AdapterError(f"adapter {adapter_id!r}: head {name}.{param} has shape {tuple(value.shape)}, "
                                   f"the base model's is {tuple(expected[param].shape)}")
        if not state:
            raise AdapterError(f"adapter {adapter_id!r}: its modules_to_save (its config's, or its task_type's) "
                               f"names module {name}, but {WEIGHTS_FILE} has no copy of it, so PEFT cannot load "
                               "it; save the adapter again, or drop that module from modules_to_save")
        missing = sorted(set(expected) - set(state))
        if missing:
            raise AdapterError(f"adapter {adapter_id!r}: head {name} lacks {missing}")
        heads[name] = state
    return heads


def _refuse_deltas_inside_heads(tensors: dict, config, adapter_id: str) -> None:
    """Refuse low-rank weights on a module inside (or equal to) one of the adapter's own
    `modules_to_save` modules: PEFT never adapts those (its target matching excludes them),
    so it would load the adapter without them and its output would not be what was saved."""
    saved = list(config.modules_to_save or ())
    for key in sorted(tensors):
        name = _delta_module(key)
        if name is None:
            continue
        head = next((m for m in saved if re.match(rf"(^|.*\.){m}($|\..*)", name)), None)
        if head is not None:
            raise AdapterError(f"adapter {adapter_id!r} has {config.peft_type.value} weights for {name}, inside its "
                               f"own modules_to_save module {head!r} (its config's, or its task_type's); PEFT "
                               "never applies an adapter inside modules_to_save (it uses the saved copy as it "
                               f"is), so these weights would be ignored. Remove them from {WEIGHTS_FILE}, or drop "
                               f"{head!r} from modules_to_save")


def _delta_module(key: str) -> str | None:
    """The module name of a low-rank weight key (`PREFIX + name + '.lora_A.weight'`), else None."""
    for marker in _DELTA_MARKERS:
        if key.startswith(PREFIX) and key.endswith("." + marker):
            return key[len(PREFIX):-len(marker) - 1]
    return None


def _check_targets(weights: AdapterWeights, config, modules: dict[str, nn.Module], adapter_id: str) -> None:
    """The modules with weights must be exactly the modules PEFT's config matching targets."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    targeted = {n for n, m in modules.items() if n and module_dims(m) is not None
                and bool(check_target_module_exists(config, n))}
    missing = sorted(targeted - {n for n, d in weights.deltas.items() if not d.from_tokens})
    if missing:
        raise AdapterError(f"adapter {adapter_id!r}: its config targets {missing[0]} but {WEIGHTS_FILE} has no "
                           "weights for it (corrupt or truncated file?)")
    extra = sorted({n for n, d in weights.deltas.items() if not d.from_tokens} - targeted)
    if extra:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} has weights for {extra[0]}, which its config "
                           "does not target")
