"""Every latent activation of an SAE over a store, kept sparse, and what dashboards read from it.

One pass of the SAE over a store's rows records each nonzero activation as a
(row, latent, value) triple, sorted by latent. From that alone come a feature's top
examples, its quantile bands, histogram and density, the tokens it fires on, and the
context around each example (the store's token records locate every row), so no part of
the corpus is run through the model again::

    acts = FeatureActivations.collect(sae, store, n_rows=200_000)
    acts.top_examples(feature=12, n=10)     # pandas: row, value, token, context, position
    acts.feature_table(tokenizer)           # density, max activation, top tokens per latent

Shapes: ``F`` latents, ``N`` store rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .threads import follow_load


class Example(NamedTuple):
    """One activating token in its context window."""

    row: int
    """Store row."""
    value: float
    """The feature's activation there."""
    context: int
    """Index into ``store.contexts()``."""
    position: int
    """Token position within the context."""


@dataclass
class FeatureActivations:
    """Nonzero activations of every latent over the first ``n_rows`` rows of a store,
    grouped by latent (``offsets_F1[f]:offsets_F1[f+1]`` index latent ``f``'s entries)."""

    rows: np.ndarray
    """int64 store row of each activation, ascending within each latent."""
    values: np.ndarray
    """float32 activation values."""
    offsets_F1: np.ndarray
    """[d_sae + 1] int64 start of each latent's entries."""
    n_rows: int
    """Rows the SAE was run over."""
    store: object
    """The ``ActivationStore`` (for token records)."""

    @classmethod
    @torch.no_grad()
    def collect(cls, sae, store, n_rows: int | None = None, batch_size: int = 8192) -> "FeatureActivations":
        """Run ``sae`` over the store's first ``n_rows`` rows (all by default)."""
        store.require(d_in=sae.cfg.d_in, hook=sae.cfg.hook_name or None)
        total = len(store) if n_rows is None else min(n_rows, len(store))
        n_latents, device = sae.cfg.d_sae, sae.W_enc.device
        # Each batch's entries ordered by latent (then row), and how many each latent has.
        pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        counts_bF: list[torch.Tensor] = []
        with follow_load(device=device) as load:
            for start in range(0, total, batch_size):
                latents_NF = sae.encode(store.rows(start, min(total, start + batch_size)).to(device))
                row_index, latent_index = latents_NF.nonzero(as_tuple=True)  # row by row
                by_latent = torch.sort(latent_index, stable=True).indices  # each latent's rows stay ascending
                row_index, latent_index = row_index[by_latent], latent_index[by_latent]
                pieces.append(((row_index + start).cpu(), latent_index.cpu(),
                               latents_NF[row_index, latent_index].float().cpu()))
                counts_bF.append(torch.bincount(latent_index, minlength=n_latents).cpu())
                load.lap()
        return cls._merged(pieces, counts_bF, n_latents, total, store)

    @classmethod
    def _merged(cls, pieces, counts_bF, n_latents: int, n_rows: int, store) -> "FeatureActivations":
        """One record from per-batch pieces (rows, latents, values) each ordered by latent: a
        counting sort, each batch's run of a latent copied after the earlier batches' runs.
        It writes the output once and sorts nothing large: one sort of a whole dense
        baseline's 20M entries page-faulted 780 MB of fresh buffers, and in notebook 06's
        kernel on issue 20's VM those faults cost 3.7-4.6 s of system time per sort (20 us
        each), where the same sort alone in a new process took 0.7 s."""
        counts = torch.stack(counts_bF) if counts_bF else torch.zeros(0, n_latents, dtype=torch.long)
        offsets_F1 = torch.zeros(n_latents + 1, dtype=torch.long)
        torch.cumsum(counts.sum(0), 0, out=offsets_F1[1:])
        earlier_bF = counts.cumsum(0) - counts  # entries of each latent in the batches before
        rows_out = torch.empty(int(offsets_F1[-1]), dtype=torch.long)
        values_out = torch.empty(int(offsets_F1[-1]), dtype=torch.float32)
        for (rows, latents, values), count_F, earlier_F in zip(pieces, counts, earlier_bF):
            run_start_F = count_F.cumsum(0) - count_F  # where each latent's run begins in the piece
            # entry i (latent f) goes to offsets[f] + earlier[f] + (i - run_start[f])
            to = (offsets_F1[:-1] + earlier_F - run_start_F)[latents] + torch.arange(len(latents))
            rows_out[to] = rows
            values_out[to] = values
        return cls(rows_out.numpy(), values_out.numpy(), offsets_F1.numpy(), n_rows, store)

    # -- per feature -----------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return len(self.offsets_F1) - 1

    def _check(self, feature: int) -> int:
        if not 0 <= feature < self.d_sae:
            raise IndexError(f"feature {feature} is out of range: this SAE has latents 0..{self.d_sae - 1}")
        return int(feature)

    def of(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, values) of one feature's nonzero activations, rows ascending."""
        f = self._check(feature)
        lo, hi = self.offsets_F1[f], self.offsets_F1[f + 1]
        return self.rows[lo:hi], self.values[lo:hi]

    def density(self) -> np.ndarray:
        """Firing frequency of every latent: [F] (share of the rows)."""
        return np.diff(self.offsets_F1) / max(1, self.n_rows)

    def context_counts(self) -> np.ndarray:
        """How many context windows each latent fires in: [F] (0 where it never fires)."""
        contexts = self.rows // self.store.manifest.rows_per_context
        starts = np.zeros(len(contexts), dtype=bool)
        starts[1:] = contexts[1:] != contexts[:-1]
        nonempty = np.diff(self.offsets_F1) > 0
        starts[self.offsets_F1[:-1][nonempty]] = True  # each latent's first entry opens a context
        out = np.zeros(self.d_sae, dtype=np.int64)
        if nonempty.any():
            out[nonempty] = np.add.reduceat(starts, self.offsets_F1[:-1][nonempty])
        return out

    def max_activation(self) -> np.ndarray:
        """Largest activation of every latent (0 where it never fires): [F]."""
        out = np.zeros(self.d_sae, dtype=np.float32)
        nonempty = np.diff(self.offsets_F1) > 0
        out[nonempty] = np.maximum.reduceat(self.values, self.offsets_F1[:-1][nonempty]) if nonempty.any() else []
        return out

    def activation_at(self, feature: int, rows: np.ndarray) -> np.ndarray:
        """The feature's activation at each of ``rows`` (0 where it does not fire)."""
        own_rows, own_values = self.of(feature)
        rows = np.asarray(rows, dtype=np.int64)
        where = np.searchsorted(own_rows, rows)
        hit = (where < len(own_rows)) & (own_rows[np.minimum(where, len(own_rows) - 1)] == rows) if len(own_rows) else np.zeros(len(rows), bool)
        out = np.zeros(len(rows), dtype=np.float32)
        out[hit] = own_values[where[hit]]
        return out

    def _examples(self, rows: np.ndarray, values: np.ndarray) -> list[Example]:
        contexts, positions = self.store.locate(rows)
        return [Example(int(r), float(v), int(c), int(p)) for r, v, c, p in zip(rows, values, contexts, positions)]

    def top_examples(self, feature: int, n: int = 10, one_per_context: bool = True) -> list[Example]:
        """The ``n`` largest activations of ``feature``, largest first; with
        ``one_per_context`` only the peak of each context window counts."""
        rows, values = self.of(feature)
        order = np.argsort(-values, kind="stable")
        if one_per_context:
            contexts, _ = self.store.locate(rows[order])
            _, first = np.unique(contexts, return_index=True)
            order = order[np.sort(first)]
        return self._examples(rows[order[:n]], values[order[:n]])

    def quantile_bands(self, feature: int, n_bands: int = 4, per_band: int = 5, seed: int = 0) -> list[dict]:
        """Examples drawn at random from equal-width bands of the activation range, highest
        band first: each ``{"low", "high", "share", "examples"}`` where ``share`` is the
        fraction of the feature's activations that fall in the band."""
        rows, values = self.of(feature)
        if len(values) == 0:
            return []
        top = float(values.max())
        edges = np.linspace(0.0, top, n_bands + 1)
        band_of = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, n_bands - 1)
        rng = np.random.default_rng(seed)
        bands = []
        for band in reversed(range(n_bands)):
            members = np.flatnonzero(band_of == band)
            chosen = np.sort(rng.choice(members, min(per_band, len(members)), replace=False)) if len(members) else members
            chosen = chosen[np.argsort(-values[chosen], kind="stable")]
            bands.append({"low": float(edges[band]), "high": float(edges[band + 1]), "share": len(members) / len(values),
                          "examples": self._examples(rows[chosen], values[chosen])})
        return bands

    def context_activations(self, feature: int, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """(tokens_L, activations_L) of the example's whole context window (0 at BOS and
        wherever the feature does not fire)."""
        tokens_L = np.asarray(self.store.contexts()[example.context])
        per, first = self.store.manifest.rows_per_context, self.store.manifest.first_position
        context_rows = example.context * per + np.arange(per)
        acts_L = np.zeros(len(tokens_L), dtype=np.float32)
        acts_L[first:] = self.activation_at(feature, context_rows)
        return tokens_L, acts_L

    def token_histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, activation counts) of every token the feature fires on."""
        rows, _ = self.of(feature)
        return np.unique(self.store.tokens_of(rows), return_counts=True)

    def token_counts(self, feature: int, n: int = 10) -> list[tuple[int, int]]:
        """The ``n`` tokens the feature fires on most often: [(token id, count)]."""
        ids, counts = self.token_histogram(feature)
        order = np.argsort(-counts, kind="stable")[:n]
        return [(int(ids[i]), int(counts[i])) for i in order]

    def top_token_share(self, feature: int) -> float:
        """Share of the feature's activations that land on its single most frequent token
        (1.0: a single-token feature)."""
        counts = self.token_counts(feature, n=1)
        firing = int(self.offsets_F1[feature + 1] - self.offsets_F1[feature])
        return counts[0][1] / firing if counts else 0.0

    def token_entropy(self, feature: int) -> float:
        """Entropy (nats) of the tokens the feature fires on, each activation counted once:
        0 for a single-token feature, log(n) for one spread evenly over n tokens."""
        _, counts = self.token_histogram(feature)
        if len(counts) == 0:
            return 0.0
        p = counts / counts.sum()
        return float(-(p * np.log(p)).sum())

    def share_in_contexts(self, feature: int, context_mask: np.ndarray) -> float:
        """Share of the feature's activations inside contexts where ``context_mask`` (bool,
        one per store context) is true: e.g. the share that falls in source code."""
        rows, _ = self.of(feature)
        if len(rows) == 0:
            return 0.0
        contexts, _ = self.store.locate(rows)
        return float(np.asarray(context_mask, dtype=bool)[contexts].mean())

    # -- all features --------------------------------------------------------------------
    def feature_table(self, tokenizer=None, n_tokens: int = 3, min_count: int = 1):
        """One row per latent that fired at least ``min_count`` times: density, log10
        density, max and mean activation, top tokens, the top token's share and the
        entropy of the tokens it fires on."""
        import pandas as pd

        counts = np.diff(self.offsets_F1)
        max_acts = self.max_activation()
        rows = []
        for feature in np.flatnonzero(counts >= max(1, min_count)):
            _, values = self.of(feature)
            top = self.token_counts(feature, n_tokens)
            rows.append({
                "feature": int(feature),
                "density": counts[feature] / self.n_rows,
                "log10_density": float(np.log10(counts[feature] / self.n_rows)),
                "max_activation": float(max_acts[feature]),
                "mean_activation": float(values.mean()),
                "top_tokens": [decode_token(tokenizer, t) for t, _ in top] if tokenizer is not None else [t for t, _ in top],
                "top_token_share": top[0][1] / counts[feature],
                "token_entropy": self.token_entropy(feature),
            })
        return pd.DataFrame(rows)


def decode_token(tokenizer, token_id: int) -> str:
    """One token id as text (leading spaces kept)."""
    return tokenizer.decode([int(token_id)], clean_up_tokenization_spaces=False)


@torch.no_grad()
def logit_effects(sae, model, feature: int, n: int = 10):
    """How a feature's decoder direction moves the logits directly (through the unembedding,
    ignoring later layers): (all effects [d_vocab], top promoted ids, top suppressed ids).
    Directions at MLP neurons or attention head outputs go through the layer's output
    weights first (``residual_direction``). The final LayerNorm's scale is left out, so
    only the ranking is meaningful."""
    direction_D = residual_direction(model, sae.cfg.hook_name, sae.W_dec[feature].detach())
    effects_V = direction_D.to(model.W_U.dtype) @ model.W_U
    return effects_V.cpu(), effects_V.topk(n).indices.tolist(), (-effects_V).topk(n).indices.tolist()


_RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")


def residual_direction(model, hook_name: str, direction_D: torch.Tensor) -> torch.Tensor:
    """The residual-stream direction [d_model] that a direction at ``hook_name`` writes:
    itself at residual-width hooks (resid, mlp_out, attn_out, embeddings), through
    ``W_out`` at ``mlp.hook_post`` and through ``W_O`` at ``attn.hook_z``. Other hooks
    (pre-activations, queries, keys, patterns) have no direct path to the logits: a clear
    error, not a meaningless answer."""
    from .models import hook_layer

    layer = hook_layer(hook_name or "")
    last = (hook_name or "").rsplit(".", 1)[-1]
    if last in _RESIDUAL_HOOKS or hook_name in ("hook_embed", "hook_pos_embed"):
        return direction_D
    if layer is not None and hook_name.endswith("mlp.hook_post"):
        return direction_D.to(model.blocks[layer].mlp.W_out.dtype) @ model.blocks[layer].mlp.W_out
    if layer is not None and hook_name.endswith("attn.hook_z"):
        W_O_HdD = model.blocks[layer].attn.W_O  # [n_heads, d_head, d_model]
        return torch.einsum("hd,hdm->m", direction_D.reshape(W_O_HdD.shape[:2]).to(W_O_HdD.dtype), W_O_HdD)
    raise ValueError(
        f"logit effects need a hook that writes to the residual stream; {hook_name!r} does not "
        "(use a resid, mlp_out, attn_out, mlp.hook_post or attn.hook_z SAE)"
    )


@torch.no_grad()
def decoder_neighbours(sae, feature: int, n: int = 5) -> list[tuple[int, float]]:
    """The ``n`` latents whose decoder atoms have the largest cosine with ``feature``'s."""
    atoms_FD = torch.nn.functional.normalize(sae.W_dec.float(), dim=1)
    cosines_F = atoms_FD @ atoms_FD[feature]
    cosines_F[feature] = -2.0
    values, indices = cosines_F.topk(min(n, len(cosines_F) - 1))
    return [(int(i), float(v)) for i, v in zip(indices, values)]
