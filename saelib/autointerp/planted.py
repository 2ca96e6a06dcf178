"""Planted features: latents defined as known functions of the tokens, over a real store's
text, to check that an explainer recovers what is there (and nothing where nothing is).

Each rule maps token windows ``[S, L]`` to activations ``[S, L]``; ``planted_activations``
turns a list of rules into a ``FeatureActivations`` over a store's rows, exactly as if an
SAE with those latents had been run over it. Activations of a firing token vary (1 to 2,
seeded) so correlation has something to predict beyond on/off.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ..features import FeatureActivations


class PlantedRule(NamedTuple):
    name: str
    """Short description, e.g. ``"' the' after ' of'"``."""
    fires: Callable[[np.ndarray], np.ndarray]
    """tokens_SL -> bool [S, L]: where the feature fires."""


def on_token(token: int, name: str = "") -> PlantedRule:
    return PlantedRule(name or f"token {token}", lambda t: t == token)


def on_token_after(previous: int, token: int, name: str = "") -> PlantedRule:
    def fires(t):
        out = np.zeros(t.shape, dtype=bool)
        out[:, 1:] = (t[:, 1:] == token) & (t[:, :-1] == previous)
        return out
    return PlantedRule(name or f"token {token} after {previous}", fires)


def inside(opening: int, closing: int, name: str = "") -> PlantedRule:
    """Every token after ``opening`` up to (not including) the next ``closing``."""
    def fires(t):
        positions = np.arange(t.shape[1])
        last_open = np.maximum.accumulate(np.where(t == opening, positions, -1), axis=1)
        last_close = np.maximum.accumulate(np.where(t == closing, positions, -1), axis=1)
        before = np.full_like(last_open, -1)
        before[:, 1:] = last_open[:, :-1]
        return (before >= 0) & (before > last_close)
    return PlantedRule(name or f"inside {opening}..{closing}", fires)


def noise(density: float = 0.02, seed: int = 0) -> PlantedRule:
    """Fires at random tokens, unrelated to the text."""
    return PlantedRule(f"noise {density:g}", lambda t: np.random.default_rng(seed).random(t.shape) < density)


def planted_activations(store, rules: list[PlantedRule], n_rows: int | None = None, seed: int = 0) -> FeatureActivations:
    """A ``FeatureActivations`` over ``store``'s first ``n_rows`` rows (complete context windows)
    whose feature ``i`` follows ``rules[i]``."""
    manifest = store.manifest
    per, first = manifest.rows_per_context, manifest.first_position
    n_contexts = (len(store) if n_rows is None else min(n_rows, len(store))) // per
    tokens_SL = np.asarray(store.contexts()[:n_contexts])
    rng = np.random.default_rng(seed)
    rows, values, counts = [], [], []
    for rule in rules:
        fires_SL = np.asarray(rule.fires(tokens_SL), dtype=bool)[:, first:]
        flat = np.flatnonzero(fires_SL.reshape(-1))  # row = context * per + position - first
        rows.append(flat)
        values.append((1 + rng.random(len(flat))).astype(np.float32))
        counts.append(len(flat))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return FeatureActivations(np.concatenate(rows).astype(np.int64), np.concatenate(values), offsets,
                              n_contexts * per, store)
