"""The adapter kinds Switchyard routes, one file each (as PEFT keeps `tuners/<type>/`), by
`peft_type`. A kind holds what it reads from an adapter folder (PEFT's config class, its
option refusals, its tensors) and how it maps onto the routed op; adding a type is one file
plus one line in `KINDS`.
"""

from __future__ import annotations

from actors.kinds import adalora, boft, ia3, loha, lokr, lora, oft, prefix, prompt, vera
from actors.kinds.common import AdapterError, Kind

KINDS: dict[str, Kind] = {kind.peft_type: kind for kind in (lora.KIND, vera.KIND, adalora.KIND, loha.KIND, ia3.KIND,
                                                             lokr.KIND, oft.KIND, boft.KIND, prompt.PROMPT_TUNING,
                                                             prompt.P_TUNING, prefix.KIND)}
# Key endings that mark one module's weights, for every kind (a module inside a head, ...).
DELTA_MARKERS: tuple[str, ...] = tuple(marker for kind in KINDS.values() for marker in kind.markers)


def kind_of(peft_type: object, adapter_id: str) -> Kind:
    """The registered kind for an adapter's `peft_type`.

    Args:
        peft_type: the `peft_type` of its adapter_config.json (any JSON value).
        adapter_id: its id, for the message.

    Returns:
        The kind.

    Raises:
        AdapterError: a type Switchyard does not route, listing the ones it does.
    """
    kind = KINDS.get(peft_type) if isinstance(peft_type, str) else None
    if kind is None:
        raise AdapterError(
            f"adapter {adapter_id!r} has type {peft_type}; Switchyard routes only {', '.join(KINDS)} adapters per "
            "row (PEFT's own mixed batches silently ignore other types). Remove it from the store or merge it into "
            "its own base model"
        )
    return kind
