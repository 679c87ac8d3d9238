"""The model-holding side of Switchyard: `Predictor` (no Ray imports) and its runtime.

`Predictor` is imported lazily so that light modules (e.g. `actors.store`, used by the job
driver's up-front checks) do not pull in torch and transformers.
"""

from __future__ import annotations

__all__ = ["Predictor"]


def __getattr__(name: str):
    if name == "Predictor":
        from actors.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
