"""Behavioural probes of a language model: induction and indirect-object identification.

Both work on any ``HookedTransformer`` (the embedded model, Pythia, GPT-2), so the model
card, the tests and the IOI notebook measure the same thing the same way.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from .ioi_templates import IOI_EVAL_TEMPLATES, IOI_OBJECTS, IOI_PLACES, template_prompt


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


class IOIPrompt(NamedTuple):
    text: str
    """The prompt, ending right before the answer."""
    io: str
    """Indirect object: the correct answer (a name)."""
    s: str
    """Subject: the name mentioned twice, the wrong answer."""
    template: int
    """Index into the template list."""
    order: str
    """``"ABBA"`` or ``"BABA"``: the order of the names in the first clause."""


def model_single_token_names(model, names: list[str]) -> list[str]:
    """The names that are one token when written with a leading space."""
    return [n for n in names if len(model.to_tokens(" " + n, prepend_bos=False)[0]) == 1]


def ioi_prompts(
    names: list[str],
    n_prompts: int = 100,
    seed: int = 0,
    templates: list[str] = IOI_EVAL_TEMPLATES,
) -> list[IOIPrompt]:
    """IOI prompts, half ABBA and half BABA, with two distinct names each."""
    if len(names) < 2:
        raise ValueError("IOI prompts need at least two single-token names")
    rng = random.Random(seed)
    prompts = []
    for i in range(n_prompts):
        index = rng.randrange(len(templates))
        io, s = rng.sample(names, 2)
        template = template_prompt(templates[index])
        order = "ABBA" if i % 2 == 0 else "BABA"
        if order == "BABA":
            # swap only the first mention: "{A} and {B}" -> "{B} and {A}"
            template = template.replace("{A} and {B}", "{B} and {A}", 1)
        text = template.format(A=io, B=s, PLACE=rng.choice(IOI_PLACES), OBJECT=rng.choice(IOI_OBJECTS))
        prompts.append(IOIPrompt(text, io, s, index, order))
    return prompts


@torch.no_grad()
def ioi_logit_diffs(model, prompts: list[IOIPrompt], batch_size: int = 32) -> torch.Tensor:
    """logit(IO) - logit(S) at each prompt's last position: [n_prompts]."""
    diffs = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        rows = [model.to_tokens(p.text)[0] for p in batch]
        lengths = torch.tensor([len(r) for r in rows])
        # Right padding is harmless: causal attention never looks ahead of the last real token.
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        logits = model(tokens.to(model.cfg.device))
        last = logits[torch.arange(len(rows)), lengths - 1]
        io_ids = torch.tensor([model.to_single_token(" " + p.io) for p in batch])
        s_ids = torch.tensor([model.to_single_token(" " + p.s) for p in batch])
        rows_idx = torch.arange(len(rows))
        diffs.append((last[rows_idx, io_ids] - last[rows_idx, s_ids]).cpu())
    return torch.cat(diffs)
