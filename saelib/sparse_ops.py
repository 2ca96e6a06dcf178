"""Autograd functions that touch only the k active latents of each row.

A TopK SAE's latents hold ``k`` nonzeros out of ``d_sae`` per row, so the decoder and
every weight gradient can be computed from ``(values_BK, indices_BK)`` alone. Plain
autograd would instead run dense ``[B, d_sae] x [d_sae, d_in]`` products in the decoder
and in both weight gradients; here the one dense product left is the encoder's forward
pass, which must see every latent to pick the top k.

Both functions reduce to one primitive, the *scatter outer product*
``out[indices[b, j]] += weights[b, j] * rows[b]``, which is a sparse ``[d_sae, B]`` by
dense ``[B, d_in]`` product (``torch.sparse.mm`` on a CSR matrix).
"""

from __future__ import annotations

import warnings

import torch

# torch flags CSR tensors as beta on every construction; the one product used here is stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def scatter_outer(indices_BK: torch.Tensor, weights_BK: torch.Tensor, rows_BD: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[f] = sum over (b, j) with indices[b, j] == f of weights[b, j] * rows[b]``: [n_out, D]."""
    B, K = indices_BK.shape
    flat_index = indices_BK.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    sorted_index = flat_index[order]
    crow = torch.zeros(n_out + 1, dtype=torch.int64, device=rows_BD.device)
    crow[1:] = torch.cumsum(torch.bincount(sorted_index, minlength=n_out), 0)
    col = torch.div(order, K, rounding_mode="floor")  # the row b each entry came from
    values = weights_BK.reshape(-1)[order].to(rows_BD.dtype)
    matrix = torch.sparse_csr_tensor(crow, col, values, size=(n_out, B), check_invariants=False)
    return torch.sparse.mm(matrix, rows_BD)


def gather_dot(rows_BD: torch.Tensor, table_FD: torch.Tensor, indices_BK: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = rows[b] . table[indices[b, j]]``: [B, K]; indices must be distinct within
    a row. A sampled dense-dense product on a CSR pattern: only the B*K dot products run,
    with no [B, K, D] gather in memory."""
    B, K = indices_BK.shape
    sorted_BK, order_BK = indices_BK.sort(dim=1)  # CSR wants ascending columns in each row
    crow = torch.arange(0, B * K + 1, K, device=rows_BD.device)
    pattern = torch.sparse_csr_tensor(crow, sorted_BK.reshape(-1), torch.zeros(B * K, dtype=rows_BD.dtype, device=rows_BD.device),
                                      size=(B, table_FD.shape[0]), check_invariants=False)
    dots_BK = torch.sparse.sampled_addmm(pattern, rows_BD, table_FD.T, beta=0.0).values().reshape(B, K)
    return torch.empty_like(dots_BK).scatter_(1, order_BK, dots_BK)


def sparse_decode_rows(values_BK: torch.Tensor, indices_BK: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]]``: [B, D] (no autograd)."""
    return torch.nn.functional.embedding_bag(indices_BK, W_dec_FD, per_sample_weights=values_BK.to(W_dec_FD.dtype), mode="sum")


class SparseDecode(torch.autograd.Function):
    """Decoder of a k-sparse code: [B, K] values and indices, W_dec [F, D] -> [B, D]."""

    @staticmethod
    def forward(ctx, values_BK, indices_BK, W_dec_FD):
        ctx.save_for_backward(values_BK, indices_BK, W_dec_FD)
        return sparse_decode_rows(values_BK, indices_BK, W_dec_FD)

    @staticmethod
    def backward(ctx, grad_BD):
        values_BK, indices_BK, W_dec_FD = ctx.saved_tensors
        grad_values = gather_dot(grad_BD, W_dec_FD, indices_BK) if ctx.needs_input_grad[0] else None
        grad_W_dec = scatter_outer(indices_BK, values_BK, grad_BD, W_dec_FD.shape[0]) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W_dec


class SparseEncode(torch.autograd.Function):
    """Selected pre-activations of the encoder, ``((x - b_dec) @ W_enc + b_enc)[b, indices[b, j]]``.

    The dense pre-activations are computed once, outside autograd, to choose ``indices``;
    they are passed in as ``pre_BK`` so nothing is recomputed. The backward pass only
    touches the selected columns: W_enc's gradient is a scatter outer product, b_enc's a
    scatter sum, and b_dec's ``-W_enc @ grad_b_enc`` (the inputs ``x`` are data).
    """

    @staticmethod
    def forward(ctx, pre_BK, x_BD, b_dec_D, W_enc_DF, b_enc_F, indices_BK):
        ctx.save_for_backward(x_BD, b_dec_D, W_enc_DF, indices_BK)
        return pre_BK.clone()

    @staticmethod
    def backward(ctx, grad_BK):
        x_BD, b_dec_D, W_enc_DF, indices_BK = ctx.saved_tensors
        d_sae = W_enc_DF.shape[1]
        grad_b_enc = torch.zeros(d_sae, dtype=grad_BK.dtype, device=grad_BK.device)
        grad_b_enc.index_add_(0, indices_BK.reshape(-1), grad_BK.reshape(-1))
        grad_W_enc = None
        if ctx.needs_input_grad[3]:
            grad_W_enc = scatter_outer(indices_BK, grad_BK, x_BD - b_dec_D, d_sae).T.contiguous()
        grad_b_dec = -(W_enc_DF @ grad_b_enc) if ctx.needs_input_grad[2] else None
        return None, None, grad_b_dec, grad_W_enc, grad_b_enc, None
