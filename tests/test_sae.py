"""The SAE modules: exact identities, sparse gradients equal dense ones, save/load."""

import json

import pytest
import torch

from saelib.sae import (
    BatchTopKSAE,
    SAEConfig,
    ReluSAE,
    SparseAutoencoder,
    geometric_median,
    init_from_data_,
    make_sae,
    top_dead,
)
from saelib.sae_io import load_sae
from saelib.sparse_ops import SparseCode, SparseDecode, SparseEncode, scatter_outer

D = 16


def identity_sae(architecture: str, k: int = D) -> torch.nn.Module:
    """Latents [relu(x), relu(-x)] and atoms [I; -I]: decodes back to x exactly."""
    sae = make_sae(SAEConfig(d_in=D, d_sae=2 * D, architecture=architecture, k=k))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_identity_dictionary_reconstructs_exactly(architecture):
    x = torch.randn(64, D)
    recon, latents = identity_sae(architecture)(x)
    assert torch.equal(recon, x)
    assert (latents >= 0).all()


def test_topk_keeps_exactly_k_and_they_are_the_largest():
    sae = make_sae(SAEConfig(d_in=D, d_sae=128, architecture="topk", k=5))
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive, so exactly k survive the ReLU
    x = torch.randn(32, D)
    latents = sae.encode(x)
    assert ((latents != 0).sum(-1) == 5).all()
    pre = sae.pre_acts(x)
    smallest_kept = latents.masked_fill(latents == 0, float("inf")).min(-1).values
    largest_dropped = pre.masked_fill(latents != 0, float("-inf")).max(-1).values
    assert (smallest_kept > largest_dropped).all()


def test_batchtopk_keeps_k_per_row_on_average_not_per_row():
    sae = make_sae(SAEConfig(d_in=D, d_sae=64, architecture="batchtopk", k=4))
    x = torch.randn(256, D) * torch.linspace(0.1, 3, 256)[:, None]  # rows of very different size
    sae.train()  # the threshold estimate updates only in training mode
    out = sae.train_forward(x)
    assert abs(out.l0.item() - 4) < 0.05
    per_row = (sae.select(sae.pre_acts(x))[0] > 0).sum(-1)
    assert per_row.max() > 4 > per_row.min()


def dense_topk_loss(sae, x):
    """The TopK loss written with dense autograd only, as a reference."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    latents = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    recon = latents @ sae.W_dec + sae.b_dec
    return (recon - x).pow(2).sum()


def grads_of(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def with_random_biases(sae):
    """Non-zero biases, so a gradient test cannot pass by a bias term vanishing."""
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_sparse_topk_gradients_equal_dense_autograd():
    torch.manual_seed(0)
    sae = with_random_biases(make_sae(SAEConfig(d_in=D, d_sae=96, architecture="topk", k=6)))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5)
    x = torch.randn(40, D, dtype=torch.float32)
    with torch.enable_grad():
        sparse = grads_of(sae, (sae.train_forward(x).recon_BD - x).pow(2).sum())
        dense = grads_of(sae, dense_topk_loss(sae, x))
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-4, msg=name)
    assert dense["W_enc"].abs().sum() > 0


def dense_batchtopk_loss(sae, x):
    """BatchTopK written with dense autograd only: the batch's k*B largest pre-activations
    pass through a ReLU (SAELens's and dictionary_learning's definition)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    flat = torch.relu(pre).flatten()
    kept = flat.topk(sae.cfg.k * len(x)).indices
    latents = torch.zeros_like(flat).scatter(0, kept, flat[kept]).reshape(pre.shape)
    return (latents @ sae.W_dec + sae.b_dec - x).pow(2).sum(), latents


def test_batchtopk_gradients_equal_dense_autograd():
    torch.manual_seed(5)
    sae = with_random_biases(make_sae(SAEConfig(d_in=D, d_sae=96, architecture="batchtopk", k=6)))
    x = torch.randn(40, D) * torch.linspace(0.2, 2, 40)[:, None]
    with torch.enable_grad():
        sparse = grads_of(sae, (sae.train_forward(x).recon_BD - x).pow(2).sum())
        dense_loss, _ = dense_batchtopk_loss(sae, x)
        dense = grads_of(sae, dense_loss)
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-4, msg=name)


def test_batchtopk_threshold_is_an_average_of_the_smallest_kept_activation():
    torch.manual_seed(6)
    sae = make_sae(SAEConfig(d_in=D, d_sae=64, architecture="batchtopk", k=4)).train()
    batches = [torch.randn(128, D) for _ in range(3)]
    expected = None
    for x in batches:
        with torch.no_grad():
            _, latents = dense_batchtopk_loss(sae, x)
        smallest = latents[latents > 0].min()
        expected = smallest if expected is None else expected + BatchTopKSAE.threshold_lr * (smallest - expected)
        before = sae.threshold.clone()
        sae.select(sae.pre_acts(x))  # selecting alone changes nothing
        assert torch.equal(sae.threshold, before)
        sae.train_forward(x)
        torch.testing.assert_close(sae.threshold, expected)
    sae.eval()
    sae.train_forward(batches[0])  # evaluation mode leaves it alone
    torch.testing.assert_close(sae.threshold, expected)


def test_scatter_outer_is_a_sum_of_outer_products():
    indices = torch.tensor([[0, 3], [3, 1], [2, 0]])
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    rows = torch.arange(6.0).reshape(3, 2)
    expected = torch.zeros(4, 2)
    for b in range(3):
        for j in range(2):
            expected[indices[b, j]] += weights[b, j] * rows[b]
    code, weights_N = SparseCode.from_rows(weights, indices, 4)
    torch.testing.assert_close(scatter_outer(code, weights_N, rows), expected)
    # The same entries as a mask: rows of any width, the empty one included.
    mask = torch.tensor([[True, False, False, True], [False, True, False, True], [False, False, False, False]])
    dense = torch.tensor([[1.0, 0, 0, 2.0], [0, 4.0, 0, 3.0], [0, 0, 0, 0]])
    code, weights_N = SparseCode.from_mask(mask, dense)
    torch.testing.assert_close(code.crow_B1, torch.tensor([0, 2, 4, 4]))
    torch.testing.assert_close(scatter_outer(code, weights_N, rows), dense.T @ rows)


def test_both_weight_gradients_of_a_step_share_one_grouping_by_latent(monkeypatch):
    """W_enc's and W_dec's gradients are scatter products over the same code; the entries are
    sorted by latent once per code (``SparseCode.by_latent``), not once per product."""
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: sorts.append(1) or argsort(*a, **kw))
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(8, 32, "topk", k=4))
    x = torch.randn(16, 8)
    out = sae.train_forward(x)
    (x - out.recon_BD).pow(2).sum().backward()
    assert sae.W_enc.grad.abs().sum() > 0 and sae.W_dec.grad.abs().sum() > 0
    assert len(sorts) == 1


@pytest.mark.parametrize("layout", ["rows", "mask"])
def test_sparse_ops_pass_gradcheck(layout):
    torch.manual_seed(1)
    if layout == "rows":  # distinct within a row, as TopK gives
        code, _ = SparseCode.from_rows(torch.zeros(5, 3), torch.rand(5, 7).argsort(dim=1)[:, :3], 7)
    else:  # uneven rows, one of them empty, as ReLU gives
        mask = torch.rand(5, 7) < 0.4
        mask[2] = False
        code, _ = SparseCode.from_mask(mask, torch.zeros(5, 7))
    n = len(code.latent_N)
    values = torch.randn(n, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: SparseDecode.apply(v, code, w), (values, W_dec))
    x = torch.randn(5, 4, dtype=torch.float64)
    b_dec = torch.randn(4, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(7, dtype=torch.float64, requires_grad=True)

    def encode(b_dec, W_enc, b_enc):
        pre = ((x - b_dec) @ W_enc + b_enc)[code.row_N, code.latent_N]
        return SparseEncode.apply(pre.detach(), code, x, b_dec, W_enc, b_enc)

    assert torch.autograd.gradcheck(encode, (b_dec, W_enc, b_enc))


@pytest.mark.parametrize("d_in, d_sae", [(D, 32), (512, 1200)])  # one block of rows; three, the last short
def test_remove_parallel_grad_and_unit_norm(d_in, d_sae):
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(d_sae, 1) * 3 + 0.5)  # rows of different norms
    grad = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grad_()
    W = sae.W_dec.detach().double()
    expected = grad.double() - ((grad.double() * W).sum(1, keepdim=True) / W.square().sum(1, keepdim=True)) * W
    torch.testing.assert_close(sae.W_dec.grad.double(), expected, rtol=1e-5, atol=1e-5)
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-3
    sae.unit_norm_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(d_sae))


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk"])
def test_save_load_round_trip(tmp_path, architecture):
    torch.manual_seed(2)
    sae = make_sae(SAEConfig(d_in=D, d_sae=48, architecture=architecture, k=4, hook_name="blocks.1.hook_resid_post",
                             model_name="embedded", metadata={"trained_tokens": 123}))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if architecture == "batchtopk":
            sae.threshold.fill_(0.7)
    x = torch.randn(20, D)
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    torch.testing.assert_close(loaded(x).recon_BD, sae.eval()(x).recon_BD)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert {"d_in", "d_sae", "architecture", "metadata"} <= set(cfg)
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert loaded.cfg.metadata == {"trained_tokens": 123}
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}[architecture]
    assert not list((tmp_path / "sae").glob("*.tmp"))


def topk_sae_with_biases(d_sae: int, k: int, seed: int):
    """A TopK SAE whose biases are random too (a fresh one has them at 0)."""
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=D, d_sae=d_sae, architecture="topk", k=k))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    return sae


def test_fold_input_scale_gives_the_same_sae_on_raw_inputs():
    sae = topk_sae_with_biases(40, 3, seed=3)
    x = torch.randn(10, D) * 50
    scale = 0.02
    scaled_recon, scaled_latents = sae(x * scale)
    sae.fold_input_scale_(scale)
    raw_recon, raw_latents = sae(x)
    torch.testing.assert_close(raw_latents, scaled_latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw_recon, scaled_recon / scale, rtol=1e-4, atol=1e-3)


def test_d_in_mismatch_is_named():
    sae = make_sae(SAEConfig(d_in=D, d_sae=32))
    with pytest.raises(ValueError, match="d_in mismatch.*16.*got length 8"):
        sae(torch.randn(2, 8))


def test_unknown_architecture_and_bad_folder_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        SAEConfig(d_in=4, d_sae=8, architecture="gated")
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        load_sae(tmp_path)


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.randn(99, 3) * 0.01, torch.tensor([[1000.0, 0, 0]])])
    assert geometric_median(points).norm() < 0.1 < points.mean(0).norm()


def test_data_init_atoms_point_at_data():
    sample = torch.randn(200, D)
    sae = make_sae(SAEConfig(d_in=D, d_sae=50, architecture="topk", k=3))
    init_from_data_(sae, sample)
    cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ torch.nn.functional.normalize(sample, dim=1).T
    assert (cos.max(1).values > 0.99).all()
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_relu_sparse_path_matches_the_dense_pass(monkeypatch):
    torch.manual_seed(4)
    sae = make_sae(SAEConfig(d_in=D, d_sae=256, architecture="relu"))
    with torch.no_grad():
        sae.b_enc.fill_(-2.0)  # few latents active per row: the sparse path is taken
        sae.b_dec.normal_()
    x = torch.randn(50, D) + sae.b_dec.detach()
    x[0] = sae.b_dec.detach() + 6 * sae.W_dec.detach()[:64].sum(0)  # one row fires far more latents than the rest
    taken = []
    monkeypatch.setattr(SparseCode, "from_mask", lambda *a, f=SparseCode.from_mask: taken.append(1) or f(*a))

    def loss_of(out):
        return (out.recon_BD - x).pow(2).sum() + 0.1 * out.l1_BF_sum

    with torch.enable_grad():
        sparse_out = sae.train_forward(x)
        active = sae.pre_acts(x) > 0
        # Uneven rows (one with more than d_sae / 8 active, where a padded [B, max width] code
        # would cost more than the dense pass) still go sparse: only the total counts.
        assert taken and active.sum(-1).max() > 256 / 8 and active.float().mean() <= ReluSAE.sparse_density_limit
        sparse = grads_of(sae, loss_of(sparse_out))
        dense = grads_of(sae, loss_of(SparseAutoencoder.train_forward(sae, x)))
    for name in dense:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("dead_share", [0.05, 0.3, 1.0])
def test_top_dead_ranks_only_dead_latents_as_a_masked_top_k_does(dead_share):
    generator = torch.Generator().manual_seed(3)
    pre = torch.randn(40, 200, generator=generator)
    dead = torch.rand(200, generator=generator) < dead_share
    for aux_k in (4, int(dead.sum()), 500):  # fewer than, as many as, more than the dead
        n = min(aux_k, int(dead.sum()))
        expected_values, expected_latents = pre.masked_fill(~dead, float("-inf")).topk(n, dim=-1)
        values, latents = top_dead(pre, dead, aux_k)
        assert torch.equal(values, expected_values) and torch.equal(latents, expected_latents)
    assert top_dead(pre, torch.zeros(200, dtype=torch.bool), 4) is None and top_dead(pre, dead, 0) is None


def test_topk_selection_by_blocks_equals_the_whole_batch_selection():
    sae = topk_sae_with_biases(96, 6, seed=5)
    sae.block_rows = 16  # 50 rows: three full blocks and a short one
    x = torch.randn(50, D)
    dead = torch.rand(96) < 0.3
    (values, indices), dead_BK = sae.select_by_blocks(x, dead, aux_k=5)
    pre = sae.pre_acts(x).detach()
    expected_values, expected_indices = pre.topk(6, dim=-1)
    expected_dead = top_dead(pre, dead, 5)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(dead_BK[0], expected_dead[0])
    assert torch.equal(dead_BK[1], expected_dead[1]) and dead[dead_BK[1]].all()
    assert sae.select_by_blocks(x, torch.zeros(96, dtype=torch.bool), aux_k=5)[1] is None


def test_rows_already_sorted_by_latent_build_the_same_code_without_a_sort(monkeypatch):
    """The bf16 selection hands its entries over sorted by latent; from_rows must then skip
    its sort (one per code per step) and still build the code an unsorted hand-over gives."""
    torch.manual_seed(0)
    indices_BK = torch.rand(40, 300).argsort(dim=1)[:, :7]
    values_BK = torch.randn(40, 7)
    code, values_N = SparseCode.from_rows(values_BK, indices_BK, 300)
    latent_BK, order_BK = indices_BK.sort(dim=1)
    sorts = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorts.append(1) or real_sort(self, *a, **k))
    again, values_again_N = SparseCode.from_rows(values_BK.gather(1, order_BK), latent_BK, 300)
    assert sorts == []
    assert torch.equal(again.latent_N, code.latent_N) and torch.equal(again.row_N, code.row_N)
    assert torch.equal(again.crow_B1, code.crow_B1) and torch.equal(values_again_N, values_N)


@pytest.mark.parametrize("shape, k", [((512, 4096), 32), ((9, 16384), 64), ((5, 256), 4), ((3, 100), 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_rows_agrees_with_torch_topk(shape, k, dtype):
    from saelib.sae import top_k_rows

    generator = torch.Generator().manual_seed(shape[1])
    for tied, pre_BF in ((False, torch.randn(shape, generator=generator).to(dtype)),
                         (True, torch.randint(-20, 20, shape, generator=generator).to(dtype))):
        values_BK, indices_BK = top_k_rows(pre_BF, k)
        expected = pre_BF.topk(k, dim=-1)
        assert torch.equal(values_BK, expected.values)  # the same values, in the same (descending) order
        assert torch.equal(pre_BF.gather(1, indices_BK), values_BK)  # each index holds its value
        assert bool((indices_BK.sort(1).values.diff(dim=1) > 0).all())  # k distinct latents
        if not tied and dtype != torch.bfloat16:  # distinct values: the very same latents
            assert torch.equal(indices_BK, expected.indices)
