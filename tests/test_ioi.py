import json

import torch

from saelib.baselines import random_basis, signed_basis_sae
from saelib.ioi import counterfactual, ioi_logit_diffs, ioi_prompts, latent_groups, model_single_token_names, pair_batches, patching_curve
from saelib.paths import data_dir
from saelib.sae import SAEConfig, make_sae

HOOK = "blocks.1.hook_resid_post"


def _prompts(model, n=12):
    names = model_single_token_names(model, json.loads((data_dir() / "name_pool.json").read_text())["names"])
    return ioi_prompts(names, n_prompts=n, seed=3)


def test_counterfactual_changes_one_name_and_swaps_the_answer():
    prompt = ioi_prompts(["Mary", "John", "Anna"], n_prompts=1, seed=0)[0]
    other = counterfactual(prompt)
    assert (other.io, other.s) == (prompt.s, prompt.io)
    before, after = prompt.text.split(), other.text.split()
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and after[changed[0]].startswith(prompt.io)
    assert counterfactual(other).text == prompt.text


def test_pair_batches_differ_in_one_token(embedded):
    batches = pair_batches(embedded, _prompts(embedded))
    assert sum(len(b.io_B) for b in batches) == 12
    for b in batches:
        assert ((b.clean_BL != b.counterfactual_BL).sum(1) == 1).all()


def test_editing_nothing_is_the_clean_model_and_every_direction_of_a_basis_is_the_counterfactual(embedded):
    batches = pair_batches(embedded, _prompts(embedded))
    basis = signed_basis_sae(random_basis(embedded.cfg.d_model, seed=1), k=embedded.cfg.d_model, hook_name=HOOK)
    none, every = patching_curve(embedded, basis, batches, [0, embedded.cfg.d_model])
    clean = torch.cat([embedded(b.clean_BL)[:, -1] for b in batches])
    other = torch.cat([embedded(b.counterfactual_BL)[:, -1] for b in batches])
    io, s = torch.cat([b.io_B for b in batches]), torch.cat([b.s_B for b in batches])
    rows = torch.arange(len(io))
    clean_kl = torch.nn.functional.kl_div(clean.log_softmax(-1), other.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert abs(none.kl - clean_kl.mean().item()) < 1e-5 and none.kl > 0.1
    assert abs(none.logit_diff - (clean[rows, io] - clean[rows, s]).mean().item()) < 1e-4
    assert every.kl < 1e-4, every
    assert abs(every.logit_diff - (other[rows, io] - other[rows, s]).mean().item()) < 1e-2
    assert every.flipped == (other[rows, io] < other[rows, s]).float().mean().item()


def test_latent_groups_pair_the_signs_of_a_basis_direction():
    basis = signed_basis_sae(torch.eye(4), k=4)
    assert latent_groups(basis).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    sae = make_sae(SAEConfig(d_in=4, d_sae=6, architecture="topk", k=2))
    assert latent_groups(sae).tolist() == [[i] for i in range(6)]


def test_ioi_measures_follow_the_machine_load_with_the_same_numbers(embedded, always_busy):
    prompts = _prompts(embedded)
    batches = pair_batches(embedded, prompts)
    basis = signed_basis_sae(random_basis(embedded.cfg.d_model, seed=1), k=embedded.cfg.d_model, hook_name=HOOK)
    busy_diffs = ioi_logit_diffs(embedded, prompts, batch_size=4)
    assert always_busy[:1] == [1] and torch.get_num_threads() == 2  # fewer threads, then put back
    always_busy.clear()
    busy_curve = patching_curve(embedded, basis, batches, [0, 4, embedded.cfg.d_model])
    assert always_busy[:1] == [1] and torch.get_num_threads() == 2
    torch.set_num_threads(1)  # the baseline: on one thread a governor has nothing to take away
    settings = len(always_busy)
    # the first forward pass ran on two threads: products this small may differ in the last bits
    torch.testing.assert_close(ioi_logit_diffs(embedded, prompts, batch_size=4), busy_diffs, rtol=1e-5, atol=1e-5)
    for quiet, busy in zip(patching_curve(embedded, basis, batches, [0, 4, embedded.cfg.d_model]), busy_curve):
        assert quiet.n_edited == busy.n_edited and quiet.flipped == busy.flipped
        assert abs(quiet.kl - busy.kl) < 1e-5 and abs(quiet.logit_diff - busy.logit_diff) < 1e-4
    assert len(always_busy) == settings
