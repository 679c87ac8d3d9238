"""The model-holding side of Switchyard: `Predictor` (no Ray imports) and its runtime."""

from __future__ import annotations

from actors.predictor import Predictor

__all__ = ["Predictor"]
