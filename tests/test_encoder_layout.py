"""W_enc [d_in, d_sae] held in memory as d_sae rows (nn.Linear's layout): kept through every
path, saved in SAELens's layout, trained by an exact Adam, and a W_enc laid out the other
way (a replaced parameter, an older checkpoint) still gives the same numbers."""

import copy

import pytest
import torch

from saelib.distributed import _from_memory_order, _memory_order
from saelib.sae import SAEConfig, make_sae
from saelib.sae_io import load_sae
from saelib.sparse_ops import held_transposed, weighted_row_sum
from saelib.train import RowsAdam, SAETrainer, TrainConfig

from safetensors.torch import load_file

CFG = SAEConfig(d_in=12, d_sae=40, architecture="topk", k=3)


def _batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(256, 12, generator=generator) for _ in range(n)]


def test_w_enc_is_held_as_rows_through_every_path(tmp_path):
    sae = make_sae(CFG)
    assert held_transposed(sae.W_enc) and not held_transposed(sae.W_dec)
    assert held_transposed(copy.deepcopy(sae).W_enc)
    assert held_transposed(copy.deepcopy(sae).double().W_enc)
    saved = sae.state_dict()  # as before W_enc was held as rows: [d_in, d_sae] row by row
    assert saved["W_enc"].is_contiguous() and torch.equal(saved["W_enc"], sae.W_enc.detach())
    other = make_sae(CFG)
    other.load_state_dict(saved)
    assert held_transposed(other.W_enc) and torch.equal(other.W_enc, sae.W_enc)

    trainer = SAETrainer(sae, TrainConfig(total_tokens=4 * 256, batch_size=256, progress=False, adapt_threads=False,
                                          out_dir=str(tmp_path / "run")))
    trainer.fit(lambda: iter(_batches(4)), max_steps=2)
    assert held_transposed(sae.W_enc) and sae.W_enc.grad.stride() == sae.W_enc.stride()  # made by latent, no copy
    resumed = SAETrainer(make_sae(CFG), trainer.cfg)  # picks up the checkpoint
    assert resumed.step == 2 and held_transposed(resumed.sae.W_enc) and torch.equal(resumed.sae.W_enc, sae.W_enc)

    folder = sae.save(tmp_path / "sae")
    on_disk = load_file(folder / "sae_weights.safetensors")
    assert on_disk["W_enc"].shape == (12, 40) and torch.equal(on_disk["W_enc"], sae.W_enc.detach())
    assert held_transposed(load_sae(folder).W_enc)


def _grads_of(sae, x):
    sae.zero_grad(set_to_none=True)
    out = sae.train_forward(x)
    (x - out.recon_BD).pow(2).sum().backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("select_dtype", [torch.float32, torch.bfloat16])
def test_a_w_enc_laid_out_the_other_way_gives_the_same_step(select_dtype):
    """A W_enc replaced by a contiguous parameter (as code written for the old layout might
    do) goes through the copying paths: the same selection, values and gradients."""
    torch.manual_seed(0)
    rows = make_sae(CFG)
    with torch.no_grad():
        rows.b_enc.normal_()
    columns = copy.deepcopy(rows)
    columns.W_enc = torch.nn.Parameter(rows.W_enc.detach().contiguous())
    assert held_transposed(rows.W_enc) and not held_transposed(columns.W_enc)
    x = torch.randn(64, 12)
    for sae in (rows, columns):
        sae.select_dtype = select_dtype
    for step in range(2):  # the second after W_enc changed: no stale copy of it is used
        chosen = [sae.select_by_blocks(x)[0] for sae in (rows, columns)]
        assert torch.equal(chosen[0][1], chosen[1][1])
        torch.testing.assert_close(chosen[0][0], chosen[1][0], rtol=1e-6, atol=1e-6)
        grads = [_grads_of(sae, x) for sae in (rows, columns)]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for sae in (rows, columns):
                sae.W_enc.mul_(1.5)


def _adam_runs(grad_layout):
    """Five fused Adam steps on the same values: RowsAdam on a matrix held transposed, torch's
    Adam on a contiguous copy. ``grad_layout``: the transposed parameter's gradient laid out
    as the parameter, or contiguous (as a gradient summed across ranks could come)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(12, 40, generator=generator)
    held = torch.nn.Parameter(values.T.contiguous().T)
    plain = torch.nn.Parameter(values.clone())
    ours, theirs = RowsAdam([held], lr=1e-2, fused=True), torch.optim.Adam([plain], lr=1e-2, fused=True)
    for _ in range(5):
        grad = torch.randn(12, 40, generator=generator)
        held.grad = grad.T.contiguous().T if grad_layout == "parameter's" else grad.clone()
        plain.grad = grad.clone()
        ours.step()
        theirs.step()
    return held, plain, ours, theirs


@pytest.mark.parametrize("grad_layout", ["parameter's", "contiguous"])
def test_rows_adam_steps_as_torch_adam_on_contiguous_weights(grad_layout):
    held, plain, ours, _ = _adam_runs(grad_layout)
    assert held_transposed(held) and torch.equal(held, plain)
    assert ours._rows[0].grad is None  # nothing is left holding the gradient


def test_rows_adam_checkpoints_hold_moments_in_the_parameters_shape():
    held, plain, ours, theirs = _adam_runs("parameter's")
    saved, reference = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        assert saved["state"][0][key].shape == (12, 40)
        assert torch.equal(saved["state"][0][key], reference["state"][0][key])
    # Both layouts of the moments load (torch.optim.Adam's, as older checkpoints hold them),
    # and the run goes on exactly as the uninterrupted one.
    grad = torch.randn(12, 40, generator=torch.Generator().manual_seed(5))
    plain.grad = grad.clone()
    theirs.step()
    for state in (saved, reference):
        param = torch.nn.Parameter(held.detach().clone())  # clone keeps the layout
        assert held_transposed(param)
        resumed = RowsAdam([param], lr=1e-2, fused=True)
        resumed.load_state_dict(copy.deepcopy(state))
        param.grad = grad.T.contiguous().T
        resumed.step()
        assert torch.equal(param, plain)


def test_gradients_cross_ranks_in_memory_order_and_come_back_laid_out_alike():
    param = torch.nn.Parameter(torch.randn(40, 12).T)
    grad = torch.randn(40, 12).T  # as the parameter
    flat = _memory_order(grad, param).reshape(-1)
    assert flat.data_ptr() == grad.data_ptr()  # a view: no copy on the way out
    back = _from_memory_order(flat.clone(), param)
    assert back.stride() == param.stride() and torch.equal(back, grad)
    contiguous = torch.randn(12, 40)  # laid out otherwise: copied into the parameter's order
    assert torch.equal(_from_memory_order(_memory_order(contiguous, param).reshape(-1), param), contiguous)


@pytest.mark.parametrize("F, D", [(300, 7), (4096, 256), (2000, 600)])
def test_weighted_row_sum_is_the_sum_whatever_the_thread_count(F, D):
    rows, weights = torch.randn(F, D), torch.randn(F) * (torch.rand(F) < 0.7)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(weighted_row_sum(rows, weights))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0].double(), rows.double().T @ weights.double(), rtol=1e-5, atol=1e-4)
