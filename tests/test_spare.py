"""Gradients kept from one step for the next (saelib.spare): reused only when nothing else
holds them, every element rewritten, training unchanged."""

import numpy as np
import pytest
import torch

from saelib import spare
from saelib.sae import SAEConfig, make_sae
from saelib.sparse_ops import SparseCode, scatter_outer
from saelib.train import SAETrainer, TrainConfig


@pytest.fixture(autouse=True)
def no_spares():
    spare.drop()
    yield
    spare.drop()


def _param_with_grad():
    param = torch.nn.Parameter(torch.randn(64, 32))
    (param * 2).sum().backward()
    return param


@pytest.mark.parametrize("held_as", [None, "tensor", "view", "list", "detached", "numpy", "storage"])
def test_a_gradient_is_reused_only_when_nothing_else_holds_it(held_as):
    param = _param_with_grad()
    address = param.grad.data_ptr()
    held = {None: lambda g: None, "tensor": lambda g: g, "view": lambda g: g[3], "list": lambda g: [g],
            "detached": lambda g: g.detach(), "numpy": lambda g: g.numpy(),
            "storage": lambda g: g.untyped_storage()}[held_as](param.grad)
    spare.recycle_grads_([param])
    assert param.grad is None  # as zero_grad(set_to_none=True)
    taken = spare.empty((64, 32))
    assert (taken.data_ptr() == address) == (held_as is None)
    if held is not None:  # what the caller holds keeps its values
        taken.fill_(float("nan"))
        assert np.all(np.asarray(held if held_as != "storage" else param.new_empty(0).set_(held)) == 2)


def test_kept_tensors_are_bounded_per_shape_and_layout():
    assert [spare.keep(torch.empty(8, 4)) for _ in range(spare.PER_SHAPE + 2)] == [True] * spare.PER_SHAPE + [False] * 2
    assert spare.keep(torch.empty_strided((8, 4), (1, 8)))  # another layout of the same shape: kept apart
    assert spare.empty((8, 4), stride=(1, 8)).stride() == (1, 8)
    assert spare.empty((8, 4)).stride() == (4, 1)


def _poison_spares(shapes):
    """Fill the kept tensors with NaN, as garbage left from earlier use might be."""
    for shape in shapes:
        for _ in range(spare.PER_SHAPE):
            spare.keep(torch.full(shape, float("nan")))


def test_scatter_product_into_kept_memory_writes_every_row():
    """Latents without entries get zero rows, and nothing left in the memory leaks in."""
    mask = torch.tensor([[True, False, False, True, False], [False, True, False, True, False],
                         [False, False, False, False, False]])
    dense = torch.tensor([[1.0, 0, 0, 2.0, 0], [0, 4.0, 0, 3.0, 0], [0, 0, 0, 0, 0]])
    rows = torch.arange(6.0).reshape(3, 2)
    code, weights_N = SparseCode.from_mask(mask, dense)
    _poison_spares([(5, 2)])
    out = scatter_outer(code, weights_N, rows)
    torch.testing.assert_close(out, dense.T @ rows)


def _sparse_step_grads(sae, x):
    out = sae.train_forward(x)
    (x - out.recon_BD).pow(2).sum().backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def test_sparse_gradients_in_poisoned_kept_memory_equal_fresh_ones():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(8, 32, "topk", k=4))
    x = torch.randn(16, 8)
    fresh = _sparse_step_grads(sae, x)
    sae.zero_grad(set_to_none=True)
    _poison_spares([(32, 8), (8, 32)])
    kept = _sparse_step_grads(sae, x)
    for name in fresh:
        assert torch.equal(kept[name], fresh[name]), name


def _train(steps, keep_spares, poison=False):
    torch.manual_seed(0)
    data = [torch.randn(256, 16) for _ in range(steps)]
    sae = make_sae(SAEConfig(16, 64, "topk", k=4))
    trainer = SAETrainer(sae, TrainConfig(total_tokens=256 * steps, batch_size=256, progress=False,
                                          adapt_threads=False, dead_tokens=256))
    addresses = []
    for batch in data:
        if poison:
            _poison_spares([(64, 16), (16, 64)])
        trainer.train_step(batch)
        addresses.append(sae.W_dec.grad.data_ptr())
        if not keep_spares:
            spare.drop()
    return sae, addresses


def test_training_reuses_its_gradients_and_gets_the_same_weights():
    reused, addresses = _train(4, keep_spares=True)
    assert len(set(addresses[1:])) == 1 and addresses[1] == addresses[0]  # step 2 on wrote into step 1's
    fresh, _ = _train(4, keep_spares=False)
    poisoned, _ = _train(4, keep_spares=False, poison=True)
    for name, param in reused.named_parameters():
        assert torch.equal(param, dict(fresh.named_parameters())[name]), name
        assert torch.equal(param, dict(poisoned.named_parameters())[name]), name


class _OnesGrad(torch.autograd.Function):
    """Sums a [64, 32] weight; its backward writes the gradient into a ``spare.empty`` tensor."""

    given = []

    @staticmethod
    def forward(ctx, weight):
        return weight.sum().reshape(1)

    @staticmethod
    def backward(ctx, grad):
        out = spare.empty((64, 32)).fill_(1.0)
        _OnesGrad.given.append(out.data_ptr())
        return out


def test_a_kept_gradient_takes_a_second_contribution_in_place():
    """Two uses of a weight (a step with AuxK decodes twice): autograd sums the second gradient
    into the first in place, as it does for fresh tensors, so the step allocates nothing new.
    Checking a tensor with a Python storage object once pinned its memory and stopped that."""
    param = _param_with_grad()
    spare.recycle_grads_([param])
    kept = spare.empty((64, 32))
    address = kept.data_ptr()
    assert spare.keep(kept)
    del kept
    _OnesGrad.given.clear()
    (_OnesGrad.apply(param) + _OnesGrad.apply(param)).sum().backward()
    assert _OnesGrad.given[0] == address and param.grad.data_ptr() == address
    assert torch.equal(param.grad, torch.full((64, 32), 2.0))
