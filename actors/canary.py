"""The load-time canary: the Predictor refuses to start (and `load_adapter` refuses an
adapter) when one of four checks fails.

1. Each routed module against PEFT's own layer for that adapter, on random inputs: PEFT
   builds its layers from the adapter's folder (config and weights, read by PEFT) around the
   very base modules Switchyard wraps. This catches a wrong read of an adapter (a scaling,
   a transposition, a module PEFT adapts that Switchyard does not route, or the reverse).
2. Every routed layer must be on the model's call path: a base module called without the
   layer that wraps it (a layer installed where nothing calls it) drops that adapter's delta.
3. Synthetic rows of ragged lengths through one mixed batch and through each adapter alone
   must agree, measured against the adapter's own effect (mixed - base against alone - base),
   never below float noise. This catches architectures whose internal reshaping (patches,
   packing away the padding) sends a row through another row's adapter.
4. Prompt learning (which adapts no module, so check 1 has nothing to compare) for generate
   and embed: one synthetic row through PEFT's own prompt model, built around the live model
   from the adapter's folder, against the same row routed. This catches a virtual token or
   prefix put where PEFT does not put it (positions, masks, cache layout) on an architecture
   the tests have not seen. (For classify, PEFT would wrap the live model's head: check 3
   only.)
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from actors.adapters import WEIGHTS_FILE, module_dims, peft_modules_to_save
from actors.kinds import kind_of
from actors.layers import Route, current_route, routing

logger = logging.getLogger(__name__)
ROWS_PER_ADAPTER = 2
ADAPTERS_PER_CHECK = 16
MODULE_CHECK_ROWS = 4  # random inputs per routed module
RAGGED_STEP = 1  # synthetic row k loses (k % 4) * RAGGED_STEP tokens: every chunk has padding
# (noise, relative) tolerance: |mixed - alone| <= noise * max(1, |alone|) + relative * |alone - base|.
MODEL_TOLERANCE = {"full": (1e-4, 1e-3), "half": (5e-2, 1e-2)}
MODULE_TOLERANCE = {"full": (1e-5, 1e-3), "half": (2e-2, 5e-2)}


def check_routing(predictor, adapter_ids: list[str] | None = None) -> None:
    """Run the four checks for `adapter_ids` (default: every adapter of the store, those
    already loaded first; the others load through the LRU set).

    Args:
        predictor: a Predictor whose runtime holds the adapters (published or pending).
        adapter_ids: the adapters to check.

    Raises:
        RuntimeError: naming the adapter (or module) and the largest difference.
    """
    runtime, task = predictor.runtime, predictor.task
    if adapter_ids is None:
        loaded = runtime.loaded_ids
        adapter_ids = loaded + [a for a in runtime.adapter_ids if a not in set(loaded)]
    ids = list(adapter_ids)
    step = max(1, min(ADAPTERS_PER_CHECK, runtime.capacity))
    for start in range(0, max(len(ids), 1), step):
        _check_chunk(runtime, task, ids[start : start + step], seed=start)
    logger.info("canary: %d adapters agree with PEFT's layers and with themselves alone", len(ids))


def _check_chunk(runtime, task, ids: list[str], seed: int) -> None:
    """The four checks for up to `capacity` adapters, pinned together, plus base rows."""
    owners = [ids[k % len(ids)] if ids else None for k in range(ROWS_PER_ADAPTER * len(ids))] + [None, None]
    rows = _ragged(task.synthetic(len(owners), seed))
    dtype = next(runtime.model.parameters()).dtype
    with runtime.acquire([a for a in owners if a], include_pending=True) as slots:
        with torch.no_grad():  # not inference mode: PEFT builds its layers here
            for adapter in ids:
                _check_modules(runtime, adapter, slots[adapter], dtype)
                _check_prompt(runtime, task, adapter, slots[adapter], dtype)
        with torch.inference_mode():
            _check_rows(runtime, task, rows, owners, slots, dtype)


def _check_rows(runtime, task, rows: list, owners: list, slots: dict[str, int], dtype: torch.dtype) -> None:
    """Checks 2 and 3: the mixed batch reaches every routed layer, and each adapter's rows
    in it equal its rows alone."""
    with runtime.route([slots.get(a, 0) for a in owners]), _calls_outside_routed_layers(runtime) as bypassed:
        mixed = task.forward(rows)
    _refuse_bypassed(bypassed)
    with runtime.route([0] * len(rows)):
        base = task.forward(rows)
    for adapter in dict.fromkeys(owners):
        picked = [k for k, a in enumerate(owners) if a == adapter]
        alone = _alone(runtime, task, rows, picked, slots.get(adapter, 0))
        keep = _valid(rows, picked, mixed, task)
        _compare(mixed[picked][keep], alone[keep], base[picked][keep], adapter, dtype)


def _ragged(rows: list) -> list:
    """Text rows cut to different lengths (row k loses (k % 4) tokens, at least one stays)."""
    for k, row in enumerate(rows):
        if isinstance(row.inputs, list):
            row.inputs = row.inputs[: max(1, len(row.inputs) - (k % 4) * RAGGED_STEP)]
    return rows


def _alone(runtime, task, rows: list, picked: list[int], slot: int) -> torch.Tensor:
    """`rows[picked]` through one adapter, padded as in the mixed batch: the chunk's longest
    row (same adapter) joins them when none of theirs is that long, and is dropped after."""
    batch = [rows[k] for k in picked]
    longest = max(rows, key=_length)
    if _length(longest) > max(_length(r) for r in batch):
        batch.append(longest)
    with runtime.route([slot] * len(batch)):
        return task.forward(batch)[: len(picked)]


def _length(row) -> int:
    """Token count of a text row (0 for images)."""
    return len(row.inputs) if isinstance(row.inputs, list) else 0


def _valid(rows: list, picked: list[int], mixed: torch.Tensor, task) -> torch.Tensor | slice:
    """Which entries of per-token outputs `[B, T, ...]` hold real tokens of `rows[picked]`
    (padding is left or right, as the task pads); everything for per-row outputs."""
    if mixed.dim() < 3 or not isinstance(rows[0].inputs, list):
        return slice(None)
    length = mixed.shape[1]
    positions = torch.arange(length, device=mixed.device)
    lengths = torch.tensor([_length(rows[k]) for k in picked], device=mixed.device)[:, None]
    if getattr(task, "left_padding", False):
        return positions[None, :] >= length - lengths  # [n, T]
    return positions[None, :] < lengths  # [n, T]


def _compare(mixed: torch.Tensor, alone: torch.Tensor, base: torch.Tensor, adapter: str | None,
             dtype: torch.dtype) -> None:
    """Raise if mixed and single-adapter outputs differ beyond float noise plus a small
    fraction of the adapter's own effect on the output (`alone - base`)."""
    diff = (mixed.float() - alone.float()).abs().max().item() if mixed.numel() else 0.0
    effect = (alone.float() - base.float()).abs().max().item() if alone.numel() else 0.0
    scale = max(1.0, alone.float().abs().max().item()) if alone.numel() else 1.0
    noise, relative = MODEL_TOLERANCE[_precision(dtype)]
    tolerance = noise * scale + relative * effect
    if not diff <= tolerance:
        name = "the base model" if adapter is None else f"adapter {adapter!r}"
        raise RuntimeError(f"start-up canary: rows of {name} in a mixed batch differ from running it alone by "
                           f"{diff:.3g} (tolerance {tolerance:.3g}), against an effect of {effect:.3g} over the base "
                           "model; this architecture reshapes its batch in a way Switchyard cannot route. Refusing "
                           "to start")


def _precision(dtype: torch.dtype) -> str:
    """'full' for float32/float64, 'half' for bfloat16/float16."""
    return "full" if dtype in (torch.float32, torch.float64) else "half"


@contextlib.contextmanager
def _calls_outside_routed_layers(runtime) -> Iterator[dict[str, int]]:
    """Count, for this thread's current route only, how often each routed layer's wrapped
    module is called beyond the layer itself calling it; yields name -> extra calls."""
    route = current_route()
    counts: dict[str, int] = {}
    handles = []
    wrappers = {**runtime.lowrank_layers, **{f"{n} (head)": h for n, h in runtime.heads.items()}}
    for name, wrapper in wrappers.items():
        counts[name] = 0
        handles.append(wrapper.register_forward_pre_hook(_counter(counts, name, route, -1)))
        handles.append(wrapper.base_layer.register_forward_pre_hook(_counter(counts, name, route, +1)))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _counter(counts: dict[str, int], name: str, route: Route | None, step: int):
    """A forward pre-hook adding `step` to `counts[name]` on calls made under `route`."""
    def hook(module, args):
        if current_route() is route:  # other threads' calls (live traffic) are not counted
            counts[name] += step
    return hook


def _refuse_bypassed(bypassed: dict[str, int]) -> None:
    """Raise for a base module the model called without the routed layer around it."""
    for name, extra in sorted(bypassed.items()):
        if extra > 0:
            module = name.removesuffix(" (head)")
            raise RuntimeError(f"start-up canary: the model calls {module} without the routed layer Switchyard "
                               f"installed around it ({extra} call(s) bypassed it), so adapters on {module} would "
                               "be silently skipped; this architecture reaches its modules in a way Switchyard "
                               "cannot route. Refusing to start")


def _check_modules(runtime, adapter_id: str, slot: int, dtype: torch.dtype) -> None:
    """Every module PEFT or Switchyard adapts for `adapter_id`, on random inputs: Switchyard's
    routed layer at `slot` against PEFT's own layer built from the adapter's folder."""
    peft_layers = _peft_layers(runtime, adapter_id)
    ours = {n: layer for n, layer in runtime.lowrank_layers.items() if slot in layer.used}
    for name in sorted(set(peft_layers) | set(ours)):
        base = runtime.base.modules[name]
        x = _random_input(base, slot)
        reference = base(x)
        with routing(Route(torch.full((x.shape[0],), slot, device=x.device))):  # routing itself is check 3's
            got = ours[name](x) if name in ours else reference
        want = peft_layers[name](x) if name in peft_layers else reference
        _compare_module(got, want, reference, adapter_id, name, dtype)


def _check_prompt(runtime, task, adapter_id: str, slot: int, dtype: torch.dtype) -> None:
    """Check 4: a prompt-learning adapter's synthetic row, routed alone, against PEFT's own
    prompt model (virtual tokens or prefix as PEFT places them) on the unpadded row."""
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = runtime.store.path(adapter_id)
    config = PeftConfig.from_pretrained(str(path))
    if not kind_of(config.peft_type.value, adapter_id).prompt or task.name not in ("generate", "embed"):
        return
    row = task.synthetic(1, seed=slot)[0]
    with runtime.route([slot]):
        ours = task.forward([row])
    with runtime.route([0]):
        base = task.forward([row])
    ids = torch.tensor([row.inputs], device=ours.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about token type ids and custom models
        model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type](runtime.model, config)
        set_peft_model_state_dict(model, load_file(str(path / WEIGHTS_FILE)))
        out = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))  # no route: the base model
    if task.name == "generate":
        want = out.logits[:, -ids.shape[1]:].float()  # the row's tokens, after any virtual ones
    else:
        from actors.tasks.pooling import pool

        want = pool(out.last_hidden_state[:, -ids.shape[1]:].float(), torch.ones_like(ids), task.spec)
    _compare_module(ours, want, base, adapter_id, "", dtype, prompt=True)


def _random_input(base: nn.Module, seed: int) -> torch.Tensor:
    """Random rows for base module `base`: token ids for an embedding, activations otherwise."""
    weight = next(base.parameters())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d_in, _ = module_dims(base)
    if isinstance(base, nn.Embedding):
        return torch.randint(0, d_in, (MODULE_CHECK_ROWS, 3), generator=gen).to(weight.device)
    return torch.randn(MODULE_CHECK_ROWS, d_in, generator=gen).to(device=weight.device, dtype=weight.dtype)


def _compare_module(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, adapter_id: str, name: str,
                    dtype: torch.dtype, prompt: bool = False) -> None:
    """Raise if Switchyard's routed module and PEFT's layer (`prompt`: the routed row and
    PEFT's prompt model, at the whole model's tolerance) disagree beyond noise plus a small
    fraction of PEFT's delta."""
    diff = (got.float() - want.float()).abs().max().item()
    effect = (want.float() - base.float()).abs().max().item()
    noise, relative = (MODEL_TOLERANCE if prompt else MODULE_TOLERANCE)[_precision(dtype)]
    tolerance = noise * max(1.0, base.float().abs().max().item()) + relative * effect
    if not diff <= tolerance:
        where, reference = ("'s row", "PEFT's own prompt model") if prompt else (f" on module {name}",
                                                                                  "PEFT's own layer for it")
        raise RuntimeError(f"start-up canary: adapter {adapter_id!r}{where} differs from {reference} by {diff:.3g} "
                           f"(tolerance {tolerance:.3g}; PEFT's delta there is {effect:.3g}) on random inputs: "
                           "Switchyard read or placed this adapter wrongly. Refusing to start; please report it with "
                           "the adapter's adapter_config.json")


def _peft_layers(runtime, adapter_id: str) -> dict[str, nn.Module]:
    """PEFT's own tuner layers for one adapter, by base module name, built by PEFT from the
    adapter's folder around the shared base modules (which PEFT only references)."""
    from peft import PeftConfig, PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = runtime.store.path(adapter_id)
    config = PeftConfig.from_pretrained(str(path))
    kind = kind_of(config.peft_type.value, adapter_id)
    if kind.prompt:  # prompt learning adapts no module: check 3 covers its rows
        return {}
    own = kind.tensor_prefix  # its kind's weights, not heads or base copies
    config.modules_to_save = peft_modules_to_save(config)  # as PEFT's task classes (the oracle's) do
    tokens = getattr(config, "trainable_token_indices", None)
    if tokens:  # PEFT places these from the whole model's embeddings: built apart, below
        config.trainable_token_indices = None
    container = _leaf_container(runtime.base.modules, list(config.modules_to_save or ()))
    tensors = load_file(str(path / WEIGHTS_FILE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about custom models and about keys it does not need
        model = PeftModel(container, config)
        set_peft_model_state_dict(model, {k: v for k, v in tensors.items() if own in k})
    model.eval()
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}
    if tokens:
        config.trainable_token_indices = tokens
        layers.update(_peft_token_layers(runtime.base.modules, config, tensors, adapter_id))
    return layers


def _peft_token_layers(modules: dict[str, nn.Module], config, tensors: dict, adapter_id: str) -> dict[str, nn.Module]:
    """PEFT's own trainable-tokens layers for an adapter's `trainable_token_indices`: the input
    embedding's and those of the output layers tied to it."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from actors.kinds.tokens import DELTA, token_targets

    name, indices, tied = token_targets(config, modules, adapter_id)
    layer = TrainableTokensLayer(modules[name], "default")
    layer.update_layer("default", token_indices=indices)
    layer.trainable_tokens_delta["default"].data.copy_(tensors[f"base_model.model.{name}.{DELTA}"])
    return {name: layer, **{n: TrainableTokensLayer(modules[n], "default", tied_adapter=layer) for n in tied}}


def _leaf_container(modules: dict[str, nn.Module], modules_to_save: list[str]) -> nn.Module:
    """A bare module tree holding, under their own dotted names, every base module PEFT
    could adapt (Linear, Conv1D, Embedding), except those inside `modules_to_save` (PEFT
    never adapts those). The modules are the base model's own, not copies."""
    root = nn.Module()
    for name, module in modules.items():
        if not name or module_dims(module) is None or _saved_whole(name, modules_to_save):
            continue
        parent = root
        for part in name.split(".")[:-1]:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(name.rpartition(".")[2], module)
    return root


def _saved_whole(name: str, modules_to_save: list[str]) -> bool:
    """Whether `name` is, or is inside, a module PEFT wraps for `modules_to_save` (PEFT
    matches a module whose name ends with an entry)."""
    parts = name.split(".")
    prefixes = [".".join(parts[: k + 1]) for k in range(len(parts))]
    return any(prefix.endswith(m) for prefix in prefixes for m in modules_to_save)
