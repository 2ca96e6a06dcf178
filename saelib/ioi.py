"""Indirect-object identification (IOI): prompts, the logit difference, counterfactual
prompt pairs and feature patching.

The experiment of Cunningham et al. 2023 (§5): take an IOI prompt ("... John gave a drink
to" → Mary) and its counterfactual, where the subject's second mention is replaced by the
indirect object ("... Mary gave a drink to" → John), so the two prompts differ in one token
and the answer flips. At one hook, write the clean run's activation in some basis (an SAE's
latents, PCA, neurons), then overwrite the coordinates of ``n`` directions with the
counterfactual run's values. How many directions must be edited before the model's output
matches the counterfactual? A dictionary whose directions are the model's own variables
should need few; a dense basis needs many.

Edits go through ``saelib.splice`` with the error term kept, so editing nothing gives the
clean logits exactly, and in a complete basis (a signed-basis baseline with ``k = d_in``)
editing every direction gives the counterfactual logits up to rounding.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .splice import spliced
from .threads import follow_load
from .zoo.ioi_templates import IOI_EVAL_TEMPLATES, IOI_OBJECTS, IOI_PLACES, template_prompt


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
    with follow_load(device=model.cfg.device) as load:
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
            load.lap()
    return torch.cat(diffs)


def counterfactual(prompt: IOIPrompt) -> IOIPrompt:
    """``prompt`` with the subject's second mention replaced by the indirect object: the
    other name becomes the answer, and only that one token changes."""
    cut = prompt.text.rindex(" " + prompt.s)
    text = prompt.text[:cut] + " " + prompt.io + prompt.text[cut + 1 + len(prompt.s) :]
    return prompt._replace(text=text, io=prompt.s, s=prompt.io)


class PairBatch(NamedTuple):
    """Clean prompts and their counterfactuals of one token length."""

    clean_BL: torch.Tensor
    """Clean prompt tokens (BOS first)."""
    counterfactual_BL: torch.Tensor
    """Counterfactual tokens: ``clean_BL`` with one position changed per row."""
    io_B: torch.Tensor
    """Token of the clean prompt's answer (the indirect object)."""
    s_B: torch.Tensor
    """Token of the clean prompt's subject (the counterfactual's answer)."""


def pair_batches(model, prompts: list[IOIPrompt]) -> list[PairBatch]:
    """Tokenise each prompt and its counterfactual, grouped by length so they batch without padding."""
    by_length: dict[int, list] = defaultdict(list)
    for prompt in prompts:
        clean, other = model.to_tokens(prompt.text)[0], model.to_tokens(counterfactual(prompt).text)[0]
        if clean.shape != other.shape or int((clean != other).sum()) != 1:
            raise ValueError(f"counterfactual of {prompt.text!r} does not differ in exactly one token: are the names single tokens?")
        by_length[len(clean)].append((clean, other, model.to_single_token(" " + prompt.io), model.to_single_token(" " + prompt.s)))
    return [
        PairBatch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows]))
        for _, rows in sorted(by_length.items())
    ]


class PatchPoint(NamedTuple):
    """The effect of editing ``n_edited`` directions per prompt, averaged over prompts."""

    n_edited: int
    """Directions overwritten with their counterfactual values (at every position but BOS)."""
    kl: float
    """KL(counterfactual output ‖ patched output) at the answer position, nats: 0 when the
    edit reproduces the counterfactual."""
    logit_diff: float
    """logit(clean answer) − logit(counterfactual answer) after the edit: positive as long
    as the model still answers the clean prompt."""
    flipped: float
    """Share of prompts where the counterfactual answer now wins (negative logit diff)."""


def latent_groups(sae) -> torch.Tensor:
    """[n_directions, m] latent indices that form one direction: each latent alone for an
    SAE; the pair (+v, −v) for a signed-basis baseline (``saelib.baselines``), whose
    coordinate along v lives in two latents."""
    if sae.cfg.metadata.get("baseline"):
        half = sae.cfg.d_sae // 2
        return torch.stack([torch.arange(half), torch.arange(half, 2 * half)], dim=1)
    return torch.arange(sae.cfg.d_sae)[:, None]


@torch.no_grad()
def patching_curve(model, sae, batches: list[PairBatch], n_edited: list[int]) -> list[PatchPoint]:
    """Edit the ``n`` directions of ``sae`` (at its hook) whose coefficients differ most
    between each clean prompt and its counterfactual (summed |difference| over positions),
    for each ``n`` in ``n_edited``; measure how close the output comes to the counterfactual."""
    hook = sae.cfg.hook_name
    groups_GM = latent_groups(sae).to(sae.W_dec.device)
    totals = {n: torch.zeros(3) for n in n_edited}
    count = 0
    # A step of the thread governor is one forward pass: they cost alike within a batch.
    with follow_load(device=model.cfg.device) as load:
        for batch in batches:
            target_BV = model(batch.counterfactual_BL)[:, -1].float()
            load.lap()
            with spliced(model, sae, with_error=True) as record:
                model(batch.counterfactual_BL)
                other_BLF = record[hook]
                load.lap()
                model(batch.clean_BL)
                clean_BLF = record[hook]
                load.lap()
            change_BG = (other_BLF - clean_BLF)[:, 1:].abs().sum(1)[:, groups_GM].sum(-1)
            order_BG = change_BG.argsort(dim=1, descending=True)
            rows = torch.arange(len(target_BV))
            for n in n_edited:
                latents_BN = groups_GM[order_BG[:, :n]].flatten(1)

                def edit(latents_BLF, hook_point, latents_BN=latents_BN):
                    index_BLN = latents_BN[:, None, :].expand(-1, latents_BLF.shape[1], -1)
                    return latents_BLF.scatter_(2, index_BLN, other_BLF.gather(2, index_BLN))

                with spliced(model, sae, with_error=True, edit=edit):
                    patched_BV = model(batch.clean_BL)[:, -1].float()
                kl_B = F.kl_div(F.log_softmax(patched_BV, -1), F.log_softmax(target_BV, -1), log_target=True, reduction="none").sum(-1)
                diff_B = patched_BV[rows, batch.io_B] - patched_BV[rows, batch.s_B]
                totals[n] += torch.stack([kl_B.sum(), diff_B.sum(), (diff_B < 0).float().sum()]).cpu()
                load.lap()
            count += len(target_BV)
    return [PatchPoint(n, *(totals[n] / count).tolist()) for n in n_edited]
