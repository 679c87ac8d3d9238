"""Reading one PEFT adapter folder into the per-module low-rank form the routed layers use.

PEFT reads the config (`LoraConfig`/`VeraConfig.from_pretrained`) and decides which modules
a config targets (`check_target_module_exists`); the weights are read from safetensors only.
Every supported adapter becomes, per targeted module, `delta(x) = x @ A.T @ B.T + bias`
with the adapter's scaling folded into `B` and `bias`:
- LoRA:  A = lora_A, B = lora_B * s, bias = lora_B.bias * s, s = alpha/r (alpha/sqrt(r) rsLoRA).
- VeRA:  A = diag(lambda_d) @ vera_A[:, :in], B = diag(lambda_b) @ vera_B[:out, :]
  (PEFT: lambda_b * linear(lambda_d * linear(x, A), B)).
Anything whose arithmetic is not of that form is refused here, naming the adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROUTABLE_TYPES = ("LORA", "VERA")
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
PREFIX = "base_model.model."
# LoRA options whose arithmetic is not a plain low-rank delta over the shared base weights.
_UNROUTABLE_LORA_OPTIONS = (
    "use_dora", "trainable_token_indices", "alora_invocation_tokens", "use_qalora", "layer_replication",
    "target_parameters", "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config",
    "megatron_config",
)
# Heads PEFT's task classes add to `modules_to_save` before matching targets
# (PeftModelForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering).
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}
# Key endings that mark one module's low-rank weights (LoRA linear, LoRA embedding, VeRA).
_DELTA_MARKERS = ("lora_A.weight", "lora_embedding_A", "vera_lambda_d")
# Initialisations that rewrite the base weights, so the adapter only fits a modified base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass
class ModuleDelta:
    """One module's contribution: `x @ A.T @ B.T + bias`, scaling already folded in."""

    A: torch.Tensor  # [r, in]  (embedding: [r, num_embeddings])
    B: torch.Tensor  # [out, r]
    bias: torch.Tensor | None = None  # [out]

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class AdapterWeights:
    """Everything one adapter changes: low-rank deltas and whole replacement heads."""

    adapter_id: str
    peft_type: str
    deltas: dict[str, ModuleDelta] = field(default_factory=dict)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class AdapterError(ValueError):
    """An adapter that cannot be routed correctly; the message names the adapter."""


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


def module_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a module the routed layers can wrap, or None for any other module."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def read_adapter(path: Path, adapter_id: str, base: BaseTree) -> AdapterWeights:
    """Read and validate one adapter against the untouched base model.

    Args:
        path: the adapter folder (inside the store).
        adapter_id: its id, used in every error message.
        base: the base model as it was before any routed layer was installed.

    Returns:
        The adapter's per-module deltas and heads, float32 on the CPU.

    Raises:
        AdapterError: unsupported type or option, pickle weights, a corrupt file, or
            weights that do not fit the base model.
    """
    config = _read_config(path, adapter_id)
    tensors = _read_tensors(path, adapter_id)
    modules = base.modules
    weights = AdapterWeights(adapter_id, config.peft_type.value)
    weights.heads = _take_heads(tensors, config, base, adapter_id)
    _refuse_deltas_inside_heads(tensors, config, adapter_id)
    if weights.peft_type == "LORA":
        weights.deltas = _lora_deltas(tensors, config, modules, adapter_id)
    else:
        weights.deltas = _vera_deltas(tensors, config, modules, adapter_id)
    _check_targets(weights, config, modules, adapter_id)
    return weights


def _read_config(path: Path, adapter_id: str):
    """The adapter's PEFT config, refusing types and options we cannot route."""
    from peft import LoraConfig, VeraConfig

    try:
        raw = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: cannot read adapter_config.json: {e}") from e
    peft_type = raw.get("peft_type") if isinstance(raw, dict) else None
    if peft_type not in ROUTABLE_TYPES:
        raise AdapterError(
            f"adapter {adapter_id!r} has type {peft_type}; Switchyard routes only LoRA and VeRA adapters per row "
            "(PEFT's own mixed batches silently ignore other types). Remove it from the store or merge it into "
            "its own base model"
        )
    try:
        config = (LoraConfig if peft_type == "LORA" else VeraConfig).from_pretrained(str(path))
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: invalid adapter_config.json: {e}") from e
    _refuse_options(config, adapter_id)
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


def _refuse_options(config, adapter_id: str) -> None:
    """Refuse config options that change the arithmetic beyond a low-rank delta."""
    for option in _UNROUTABLE_LORA_OPTIONS:
        if getattr(config, option, None):
            raise AdapterError(f"adapter {adapter_id!r} uses {option}={getattr(config, option)!r}, which Switchyard "
                               "cannot route per row; use plain LoRA")
    if getattr(config, "bias", "none") != "none":
        raise AdapterError(f"adapter {adapter_id!r} trains base biases (bias={config.bias!r}); Switchyard shares one "
                           "base model between adapters, so only bias='none' (or lora_bias=True) is supported")
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterError(f"adapter {adapter_id!r} was initialised with {init!r}, which rewrites the base weights; "
                           "convert it to plain LoRA with PEFT's path_initial_model_for_weight_conversion")
    if config.peft_type.value == "VERA" and not config.save_projection:
        raise AdapterError(f"adapter {adapter_id!r} was saved without its VeRA projections (save_projection=False); "
                           "save it again with save_projection=True")


def _read_tensors(path: Path, adapter_id: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors only (pickle files are refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / WEIGHTS_FILE
    if not file.is_file():
        pickles = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickles:
            raise AdapterError(f"adapter {adapter_id!r} has only pickle weights ({pickles[0]}); Switchyard loads "
                               "safetensors only: re-save it with save_pretrained(safe_serialization=True)")
        raise AdapterError(f"adapter {adapter_id!r} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {adapter_id!r}: corrupt {WEIGHTS_FILE}: {e}") from e
    for key, value in sorted(tensors.items()):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterError(f"adapter {adapter_id!r}: its weights are not finite (NaN or inf in {key}); the "
                               "adapter is broken (e.g. a diverged training run): retrain or re-save it")
    return {key: value.float() for key, value in tensors.items()}


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


def _lora_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """LoRA weights per module, scaling folded into B."""
    from peft.utils.other import get_pattern_key

    deltas = {}
    for name, kind in _adapted_modules(tensors, ("lora_A.weight", "lora_embedding_A"), adapter_id):
        dims = _dims_of(modules, name, adapter_id)
        _check_base_copy(tensors, name, modules[name], adapter_id)
        if kind == "lora_embedding_A":
            A, B, bias = tensors.pop(f"{PREFIX}{name}.lora_embedding_A"), _pop(tensors, name, "lora_embedding_B", adapter_id), None
        else:
            A, B = tensors.pop(f"{PREFIX}{name}.lora_A.weight"), _pop(tensors, name, "lora_B.weight", adapter_id)
            bias = tensors.pop(f"{PREFIX}{name}.lora_B.bias", None)
        r = A.shape[0]
        r_config = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        _check_shapes(adapter_id, name, dims, A, B, bias, r_config)
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        deltas[name] = ModuleDelta(A, B * scale, None if bias is None else bias * scale)
    _refuse_leftovers(tensors, adapter_id)
    return deltas


def _vera_deltas(tensors: dict, config, modules: dict[str, nn.Module], adapter_id: str) -> dict[str, ModuleDelta]:
    """VeRA weights per module as a low-rank pair, the lambdas folded into A and B."""
    shared_A = tensors.pop("base_model.vera_A", None)  # [r, max_in]
    shared_B = tensors.pop("base_model.vera_B", None)  # [max_out, r]
    if shared_A is None or shared_B is None:
        raise AdapterError(f"adapter {adapter_id!r}: VeRA projections vera_A/vera_B missing from {WEIGHTS_FILE}")
    deltas = {}
    for name, _ in _adapted_modules(tensors, ("vera_lambda_d",), adapter_id):
        if isinstance(modules.get(name), nn.Embedding):
            raise AdapterError(f"adapter {adapter_id!r}: VeRA on embedding {name} is not supported")
        d_in, d_out = _dims_of(modules, name, adapter_id)
        lambda_d = tensors.pop(f"{PREFIX}{name}.vera_lambda_d")  # [r]
        lambda_b = _pop(tensors, name, "vera_lambda_b", adapter_id)  # [out]
        if d_in > shared_A.shape[1] or d_out > shared_B.shape[0] or lambda_b.shape[0] != d_out \
                or lambda_d.shape[0] != shared_A.shape[0]:
            raise AdapterError(f"adapter {adapter_id!r}: VeRA weights of {name} do not fit the base module "
                               f"(in {d_in}, out {d_out})")
        A = lambda_d[:, None] * shared_A[:, :d_in]
        B = lambda_b[:, None] * shared_B[:d_out, :]
        deltas[name] = ModuleDelta(A, B)
    _refuse_leftovers(tensors, adapter_id)
    return deltas


def _adapted_modules(tensors: dict, markers: tuple[str, ...], adapter_id: str) -> list[tuple[str, str]]:
    """(module name, marker) for every key `PREFIX + name + '.' + marker`."""
    found = []
    for key in list(tensors):
        for marker in markers:
            if key.startswith(PREFIX) and key.endswith("." + marker):
                found.append((key[len(PREFIX):-len(marker) - 1], marker))
    return sorted(found)


def _pop(tensors: dict, name: str, suffix: str, adapter_id: str) -> torch.Tensor:
    """Pop a tensor the format requires, naming the module if it is missing."""
    key = f"{PREFIX}{name}.{suffix}"
    if key not in tensors:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} lacks {suffix} for module {name}")
    return tensors.pop(key)


def _dims_of(modules: dict[str, nn.Module], name: str, adapter_id: str) -> tuple[int, int]:
    """(in, out) of base module `name`, refusing modules that are absent or of another kind."""
    if name not in modules:
        raise AdapterError(f"adapter {adapter_id!r} has weights for module {name}, which the base model does not "
                           "have: was it trained on another architecture or task head?")
    dims = module_dims(modules[name])
    if dims is None:
        raise AdapterError(f"adapter {adapter_id!r} targets module {name} of type {type(modules[name]).__name__}; "
                           "Switchyard routes Linear, Conv1D and Embedding modules only")
    return dims


def _check_shapes(adapter_id, name, dims, A, B, bias, r_config) -> None:
    """Refuse LoRA weights whose shapes do not fit the base module or the config's rank."""
    d_in, d_out = dims
    r = A.shape[0]
    ok = A.dim() == 2 and B.dim() == 2 and A.shape[1] == d_in and B.shape == (d_out, r)
    if not ok or (bias is not None and bias.shape != (d_out,)):
        raise AdapterError(f"adapter {adapter_id!r}: weights of module {name} (A {tuple(A.shape)}, B "
                           f"{tuple(B.shape)}) do not fit the base module (in {d_in}, out {d_out})")
    if r != r_config:
        raise AdapterError(f"adapter {adapter_id!r}: module {name} has rank {r} but its config says {r_config}")


def _check_base_copy(tensors: dict, name: str, module: nn.Module, adapter_id: str) -> None:
    """PEFT saves a copy of the base weights of targeted embeddings (and a tied lm_head);
    it must equal the shared base."""
    copy = tensors.pop(f"{PREFIX}{name}.base_layer.weight", None)
    weight = module.weight.detach().cpu()
    if copy is not None and (copy.shape != weight.shape or not torch.equal(copy.to(weight.dtype), weight)):
        raise AdapterError(f"adapter {adapter_id!r} carries its own base weights for {name} (e.g. a resized "
                           "vocabulary); Switchyard shares one base model between adapters and cannot route it")


def _refuse_leftovers(tensors: dict, adapter_id: str) -> None:
    """Any tensor we did not consume would change the oracle's output: refuse it."""
    if tensors:
        keys = sorted(tensors)
        raise AdapterError(f"adapter {adapter_id!r}: unexpected tensors in {WEIGHTS_FILE}: {keys[:3]}"
                           f"{' ...' if len(keys) > 3 else ''}")


def _check_targets(weights: AdapterWeights, config, modules: dict[str, nn.Module], adapter_id: str) -> None:
    """The modules with weights must be exactly the modules PEFT's config matching targets."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return
    targeted = {n for n, m in modules.items() if n and module_dims(m) is not None
                and bool(check_target_module_exists(config, n))}
    missing = sorted(targeted - set(weights.deltas))
    if missing:
        raise AdapterError(f"adapter {adapter_id!r}: its config targets {missing[0]} but {WEIGHTS_FILE} has no "
                           "weights for it (corrupt or truncated file?)")
    extra = sorted(set(weights.deltas) - targeted)
    if extra:
        raise AdapterError(f"adapter {adapter_id!r}: {WEIGHTS_FILE} has weights for {extra[0]}, which its config "
                           "does not target")
