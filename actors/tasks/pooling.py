"""Pooling of a last hidden state into one vector per row, as sentence-transformers' Pooling
and Normalize modules compute it (padded form). Each mode reads only a row's own tokens, so a
row's embedding does not depend on what else shares its batch."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from actors.embedding import EmbeddingSpec


def pool(hidden: torch.Tensor, mask: torch.Tensor, spec: EmbeddingSpec) -> torch.Tensor:
    """One embedding per row.

    Args:
        hidden: last hidden state [B, T, H].
        mask: attention mask [B, T] (1 = a real token).
        spec: the modes (concatenated in order) and whether to normalize.

    Returns:
        [B, H * len(spec.modes)] embeddings, unit length when `spec.normalize`.
    """
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    pooled = torch.cat([POOLERS[mode](hidden, weights) for mode in spec.modes], dim=-1)
    return F.normalize(pooled, p=2, dim=-1) if spec.normalize else pooled


def _first(weights: torch.Tensor) -> torch.Tensor:
    """Index of each row's first real token [B] (0 with right padding)."""
    return weights[..., 0].argmax(dim=1)


def _last(weights: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token [B] (argmax finds the first 1 of the flipped mask)."""
    return weights.shape[1] - 1 - weights[..., 0].flip(1).argmax(dim=1)


def _at(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden[b, index[b]] for every row b: [B, H]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def _cls(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _at(hidden, _first(weights))


def _lasttoken(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return _at(hidden, _last(weights))


def _max(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values


def _mean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _mean_sqrt_len(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9).sqrt()


def _weightedmean(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Tokens weighted 1, 2, 3, ... from each row's first real token (SGPT)."""
    positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
    weighted = weights * (positions - _first(weights).view(-1, 1, 1))  # [B, T, 1]
    return (hidden * weighted).sum(1) / weighted.sum(1).clamp(min=1e-9)


POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": _cls, "lasttoken": _lasttoken, "max": _max, "mean": _mean,
    "mean_sqrt_len_tokens": _mean_sqrt_len, "weightedmean": _weightedmean,
}
