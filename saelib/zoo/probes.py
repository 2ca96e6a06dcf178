"""Behavioural probe of a language model: induction on repeated random tokens.

Works on any ``HookedTransformer`` (the embedded model, Pythia, GPT-2). The model card's
other probe, indirect-object identification, lives with the IOI experiment in ``saelib.ioi``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class InductionResult(NamedTuple):
    first_copy_loss: float
    """Mean loss (nats) predicting the first copy of a random token sequence."""
    second_copy_loss: float
    """Mean loss predicting the same tokens again, right after the first copy."""

    @property
    def ratio(self) -> float:
        return self.second_copy_loss / self.first_copy_loss


@torch.no_grad()
def induction_losses(model, seq_len: int = 50, n_seqs: int = 32, seed: int = 0) -> InductionResult:
    """Loss on a sequence of random tokens and on its immediate repetition (BOS first).

    A model with induction heads predicts the second copy far better than the first.
    """
    generator = torch.Generator().manual_seed(seed)
    # Skip the lowest ids: byte-level and special tokens that rarely occur in text.
    low = min(300, model.cfg.d_vocab // 4)
    random_BL = torch.randint(low, model.cfg.d_vocab, (n_seqs, seq_len), generator=generator)
    bos = torch.full((n_seqs, 1), model.tokenizer.bos_token_id if model.tokenizer else 0)
    tokens = torch.cat([bos, random_BL, random_BL], dim=1).to(model.cfg.device)
    loss_BP = model(tokens, return_type="loss", loss_per_token=True)  # entry i predicts token i+1
    # The first token of each copy cannot be predicted from what precedes it.
    first = loss_BP[:, 1:seq_len].mean().item()
    second = loss_BP[:, seq_len + 1 : 2 * seq_len].mean().item()
    return InductionResult(first, second)
