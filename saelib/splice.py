"""Run a model with SAEs spliced into its hook points.

Splicing replaces a hook's activation ``x`` by the SAE's reconstruction ``x̂``. With
``with_error=True`` the SAE's error ``x − x̂`` is added back, so the model computes exactly
what it computed before while the SAE's latents become handles to edit::

    with spliced(model, sae, with_error=True, edit=lambda latents, hook: ...):
        logits = model(tokens)

The spliced activation with the error term is computed as ``x + (decode(edited) − x̂)``:
when nothing is edited the bracket is exactly zero in floating point, so the logits are
bitwise those of the clean model (not merely close), and an edit changes the activation by
exactly the decoded difference of the latents.

Position 0 (the BOS token) is left untouched by default: SAEs are trained without it
(``HarvestConfig.skip_bos``) and its activations are far outside their training
distribution. ``Untouched`` marks further positions to leave clean (``downstream_losses``
uses it for special tokens, which training leaves out too). The ablation hooks follow the
same rules, so every comparison differs only at the positions the SAE was trained on.

Hooks with head axes (``attn.hook_z`` [batch, pos, head, d_head]) are flattened to
[batch, pos, d_in] for the SAE and reshaped back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch

from .models import check_hook_name

# edit(latents_BLF, hook) -> edited latents_BLF (same shape); may modify in place.
LatentEdit = Callable[[torch.Tensor, object], torch.Tensor]


def _flat(act: torch.Tensor) -> torch.Tensor:
    """[batch, pos, ...] -> [batch, pos, d_in]."""
    return act.reshape(*act.shape[:2], -1)


class Untouched:
    """Positions a hook leaves as they were, beyond BOS, set before each forward pass:
    ``BL`` a bool [batch, pos] tensor (True: keep the clean activation), or None."""

    def __init__(self, BL: torch.Tensor | None = None):
        self.BL = BL


def _keep_bos(new_BLD: torch.Tensor, x_BLD: torch.Tensor, skip_bos: bool,
              untouched: Untouched | None = None) -> torch.Tensor:
    """``new_BLD`` (always a fresh tensor) with position 0 put back when ``skip_bos``, and
    the positions ``untouched.BL`` marks."""
    if skip_bos and new_BLD.shape[1] > 0:
        new_BLD[:, 0] = x_BLD[:, 0]
    if untouched is not None and untouched.BL is not None:
        keep_BL = untouched.BL.to(new_BLD.device)
        new_BLD[keep_BL] = x_BLD[keep_BL]
    return new_BLD


def sae_hook(sae, with_error: bool = False, skip_bos: bool = True, edit: LatentEdit | None = None,
             record: dict | None = None, untouched: Untouched | None = None):
    """A TransformerLens forward hook that puts ``sae``'s reconstruction in place of the
    activation. ``edit`` may change the latents first; ``record`` (a dict) receives the
    latents [batch, pos, d_sae] under the SAE's hook name; ``untouched`` marks more positions
    to leave clean (special tokens)."""
    # The SAE's own name, not hook.name: TransformerBridge calls a hook asked for by an alias
    # (blocks.1.hook_resid_post) under its canonical name (blocks.1.hook_out).
    name = sae.cfg.hook_name

    def hook_fn(act: torch.Tensor, hook) -> torch.Tensor:
        x_BLD = _flat(act)
        latents_BLF = sae.encode(x_BLD.to(sae.W_enc.dtype))
        if record is not None:
            record[name or hook.name] = latents_BLF
        recon_BLD = sae.decode(latents_BLF)
        if edit is not None:
            edited_BLD = sae.decode(edit(latents_BLF.clone(), hook))
        else:
            edited_BLD = recon_BLD
        if with_error:
            new_BLD = x_BLD + (edited_BLD - recon_BLD).to(x_BLD.dtype)
        else:
            new_BLD = edited_BLD.to(x_BLD.dtype)
        return _keep_bos(new_BLD, x_BLD, skip_bos, untouched).reshape(act.shape)

    return hook_fn


def ablation_hook(kind: str, mean_D: torch.Tensor | None = None, skip_bos: bool = True,
                  untouched: Untouched | None = None):
    """A forward hook that zero-ablates (``kind="zero"``) or mean-ablates (``kind="mean"``,
    ``mean_D`` [d_in] the mean activation) a hook point, BOS and ``untouched`` positions
    kept as in ``sae_hook``."""
    if kind not in ("zero", "mean"):
        raise ValueError(f"ablation kind must be 'zero' or 'mean', not {kind!r}")
    if kind == "mean" and mean_D is None:
        raise ValueError("mean ablation needs mean_D, the hook's mean activation [d_in]")

    def hook_fn(act: torch.Tensor, hook) -> torch.Tensor:
        x_BLD = _flat(act)
        if kind == "zero":
            new_BLD = torch.zeros_like(x_BLD)
        else:
            new_BLD = mean_D.to(x_BLD.device, x_BLD.dtype).expand_as(x_BLD).clone()
        return _keep_bos(new_BLD, x_BLD, skip_bos, untouched).reshape(act.shape)

    return hook_fn


def _by_hook(saes) -> dict[str, object]:
    """Accept one SAE, a list of SAEs (hook from each ``cfg.hook_name``) or {hook: sae}."""
    if isinstance(saes, Mapping):
        return dict(saes)
    if not isinstance(saes, (list, tuple)):
        saes = [saes]
    by_hook = {}
    for sae in saes:
        if not sae.cfg.hook_name:
            raise ValueError("this SAE does not record its hook (cfg.hook_name is empty): pass {hook_name: sae}")
        if sae.cfg.hook_name in by_hook:
            raise ValueError(f"two SAEs for hook {sae.cfg.hook_name!r}: splice one SAE per hook")
        by_hook[sae.cfg.hook_name] = sae
    return by_hook


@contextmanager
def spliced(model, saes, with_error: bool = False, skip_bos: bool = True, edit: LatentEdit | None = None,
            record: dict | None = None) -> Iterator[dict]:
    """Within the block, ``model`` runs with every SAE in ``saes`` spliced into its hook.

    ``saes``: one SAE, a list of SAEs, or {hook_name: sae}. Yields the ``record`` dict
    (a new one when not given) that each forward pass fills with latents per hook.
    """
    record = {} if record is None else record
    hooks = []
    for hook_name, sae in _by_hook(saes).items():
        check_hook_name(model, hook_name)
        hooks.append((hook_name, sae_hook(sae, with_error, skip_bos, edit, record)))
    with model.hooks(fwd_hooks=hooks):
        yield record


def run_with_saes(model, tokens_BL: torch.Tensor, saes, **splice_options) -> torch.Tensor:
    """Logits [batch, pos, d_vocab] of ``model`` on ``tokens_BL`` with ``saes`` spliced in
    (options as for ``spliced``)."""
    with spliced(model, saes, **splice_options):
        return model(tokens_BL)
