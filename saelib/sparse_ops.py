"""Autograd functions that touch only the active latents of each row.

An SAE's latents hold a few nonzeros out of ``d_sae`` per row: exactly ``k`` for TopK, a
varying number for ReLU and BatchTopK. The decoder and every weight gradient can be
computed from those entries alone, kept as a ``SparseCode`` (CSR layout: which latents
each row touches) and one value per entry. Plain autograd would instead run dense
``[B, d_sae] x [d_sae, d_in]`` products in the decoder and in both weight gradients; here
the one dense product left is the encoder's forward pass, which must see every latent to
pick the active ones.

Both functions reduce to one primitive, the *scatter outer product*
``out[latent[n]] += weights[n] * rows[row[n]]``, which is a sparse ``[d_sae, B]`` by dense
``[B, d_in]`` product (``torch.sparse.mm`` on a CSR matrix).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from . import spare

# torch flags CSR tensors as beta on every construction; the products used here are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


@dataclass(frozen=True, eq=False)
class SparseCode:
    """Where a batch's entries sit: row ``b`` owns entries ``crow_B1[b]:crow_B1[b + 1]``,
    their latents ascending within the row. Values travel beside it as a flat [N] tensor."""

    crow_B1: torch.Tensor
    """int64 [B + 1]: row offsets into the entries."""
    latent_N: torch.Tensor
    """int64 [N]: the latent of each entry, distinct and ascending within a row."""
    row_N: torch.Tensor
    """int64 [N]: the row of each entry."""
    n_latents: int
    """d_sae."""

    @functools.cached_property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_N, crow_F1): the entries grouped by latent, rows ascending within a latent
        (a stable sort), and each latent's offsets into that order, int64 [n_latents + 1].
        Worked out once per code: both weight gradients of a step use it."""
        order_N = torch.argsort(self.latent_N, stable=True)
        crow_F1 = torch.zeros(self.n_latents + 1, dtype=torch.int64, device=self.latent_N.device)
        crow_F1[1:] = torch.cumsum(torch.bincount(self.latent_N, minlength=self.n_latents), 0)
        return order_N, crow_F1

    @classmethod
    def from_rows(cls, values_BK: torch.Tensor, indices_BK: torch.Tensor, n_latents: int) -> tuple["SparseCode", torch.Tensor]:
        """``K`` entries per row (TopK's selection; indices distinct within a row):
        (code, values_N) with each row's entries sorted by latent. Rows already in that order
        (as the bf16 selection hands them over) are taken as they are, without a sort."""
        if indices_BK.shape[1] > 1 and not bool((indices_BK[:, 1:] > indices_BK[:, :-1]).all()):
            indices_BK, order_BK = indices_BK.sort(dim=1)
            values_BK = values_BK.gather(1, order_BK)
        return cls.of_sorted_rows(indices_BK, n_latents), values_BK.reshape(-1)

    @classmethod
    def of_sorted_rows(cls, latent_BK: torch.Tensor, n_latents: int) -> "SparseCode":
        """``K`` entries per row whose latents already ascend within each row."""
        B, K = latent_BK.shape
        device = latent_BK.device
        crow = torch.arange(0, B * K + 1, K, device=device)
        row_N = torch.arange(B, device=device).repeat_interleave(K)
        return cls(crow, latent_BK.reshape(-1), row_N, n_latents)

    @classmethod
    def from_mask(cls, active_BF: torch.Tensor, values_BF: torch.Tensor) -> tuple["SparseCode", torch.Tensor]:
        """Every ``True`` of ``active_BF`` is an entry: (code, values_N) with ``values_BF``
        at those places. Rows may hold any number of entries, none included."""
        B, F = active_BF.shape
        row_N, latent_N = active_BF.nonzero(as_tuple=True)  # row-major: latents ascend within a row
        crow = torch.zeros(B + 1, dtype=torch.int64, device=active_BF.device)
        crow[1:] = torch.cumsum(active_BF.sum(1), 0)
        return cls(crow, latent_N, row_N, F), values_BF[row_N, latent_N]

    def fired(self, active_N: torch.Tensor) -> torch.Tensor:
        """bool [n_latents]: latents with at least one entry where ``active_N`` holds."""
        fired_F = torch.zeros(self.n_latents, dtype=torch.bool, device=self.latent_N.device)
        fired_F[self.latent_N[active_N]] = True
        return fired_F


def held_transposed(matrix: torch.Tensor) -> bool:
    """Whether ``matrix`` lies in memory as its transpose's rows: ``W_enc`` [d_in, d_sae],
    which ``SparseAutoencoder`` holds as d_sae rows of d_in, so these kernels read it and
    write its gradient by latent without a transpose."""
    return matrix.ndim == 2 and not matrix.is_contiguous() and matrix.T.is_contiguous()


def weighted_row_sum(rows_FD: torch.Tensor, weights_F: torch.Tensor) -> torch.Tensor:
    """``sum over f of weights[f] * rows[f]``: [D], in an order that does not depend on the
    thread count (the trainer changes it under load; results must not change with it).
    ``torch.mv(rows_FD.T, weights_F)`` splits the sum over f between threads: 1 and 2
    threads gave different bits. Here fixed blocks of about 1 MiB are each summed over
    their rows, which PyTorch splits between threads by column; 2.4 ms at 16384 x 512."""
    block = max(1, (1 << 18) // max(1, rows_FD.shape[1]))
    total_D = torch.zeros(rows_FD.shape[1], dtype=rows_FD.dtype, device=rows_FD.device)
    for lo in range(0, rows_FD.shape[0], block):
        total_D += (rows_FD[lo : lo + block] * weights_F[lo : lo + block, None]).sum(0)
    return total_D


def scatter_outer(code: SparseCode, weights_N: torch.Tensor, rows_BD: torch.Tensor,
                  out_FD: torch.Tensor | None = None) -> torch.Tensor:
    """``out[f] = sum over entries n of latent f of weights[n] * rows[row[n]]``: [n_latents, D],
    written into ``out_FD`` if given (contiguous; its contents are not read).
    On a CPU the product is written into a ``saelib.spare`` tensor (``addmm`` with beta 0
    writes every row, those of latents without entries too, and reads none): at 16384 x 512
    that took 9 ms where ``torch.sparse.mm`` took 23, zero-filling fresh memory and copying
    its result once more."""
    order, crow = code.by_latent
    values = weights_N[order].to(rows_BD.dtype)
    matrix = torch.sparse_csr_tensor(crow, code.row_N[order], values, size=(code.n_latents, rows_BD.shape[0]),
                                     check_invariants=False)
    if out_FD is None and rows_BD.device.type != "cpu":
        return torch.sparse.mm(matrix, rows_BD)
    if out_FD is None:
        out_FD = spare.empty((code.n_latents, rows_BD.shape[1]), rows_BD.dtype, rows_BD.device)
    return torch.addmm(out_FD, matrix, rows_BD, beta=0, out=out_FD)


def gather_dot(rows_BD: torch.Tensor, table_FD: torch.Tensor, code: SparseCode) -> torch.Tensor:
    """``out[n] = rows[row[n]] . table[latent[n]]``: [N]. A sampled dense-dense product on
    the code's CSR pattern: only the N dot products run, with no [N, D] gather in memory."""
    pattern = torch.sparse_csr_tensor(code.crow_B1, code.latent_N, torch.zeros(len(code.latent_N), dtype=rows_BD.dtype,
                                      device=rows_BD.device), size=(rows_BD.shape[0], code.n_latents), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, rows_BD, table_FD.T, beta=0.0).values()


def sparse_decode_rows(values_N: torch.Tensor, code: SparseCode, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum over row b's entries n of values[n] * W_dec[latent[n]]``: [B, D] (no autograd)."""
    return torch.nn.functional.embedding_bag(code.latent_N, W_dec_FD, offsets=code.crow_B1[:-1],
                                             per_sample_weights=values_N.to(W_dec_FD.dtype), mode="sum")


class SparseDecode(torch.autograd.Function):
    """Decoder of a sparse code: values [N] at ``code``, W_dec [F, D] -> [B, D]."""

    @staticmethod
    def forward(ctx, values_N, code, W_dec_FD):
        ctx.code = code
        ctx.save_for_backward(values_N, W_dec_FD)
        return sparse_decode_rows(values_N, code, W_dec_FD)

    @staticmethod
    def backward(ctx, grad_BD):
        values_N, W_dec_FD = ctx.saved_tensors
        grad_values = gather_dot(grad_BD, W_dec_FD, ctx.code) if ctx.needs_input_grad[0] else None
        grad_W_dec = scatter_outer(ctx.code, values_N, grad_BD) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_W_dec


class SparseEncode(torch.autograd.Function):
    """Selected pre-activations of the encoder, ``((x - b_dec) @ W_enc + b_enc)[row[n], latent[n]]``.

    The dense pre-activations are computed once, outside autograd, to choose the entries;
    they are passed in as ``pre_N`` so nothing is recomputed. The backward pass only
    touches the selected entries: W_enc's gradient is a scatter outer product, b_enc's a
    scatter sum, and b_dec's ``-W_enc @ grad_b_enc`` (the inputs ``x`` are data).
    """

    @staticmethod
    def forward(ctx, pre_N, code, x_BD, b_dec_D, W_enc_DF, b_enc_F):
        ctx.code = code
        ctx.save_for_backward(x_BD, b_dec_D, W_enc_DF)
        return pre_N.clone()

    @staticmethod
    def backward(ctx, grad_N):
        x_BD, b_dec_D, W_enc_DF = ctx.saved_tensors
        code = ctx.code
        grad_b_enc = torch.zeros(code.n_latents, dtype=grad_N.dtype, device=grad_N.device)
        grad_b_enc.index_add_(0, code.latent_N, grad_N)
        grad_W_enc = None
        if ctx.needs_input_grad[4]:
            # The product is made by latent, [d_sae, d_in]; the gradient takes the parameter's
            # layout, with no copy when W_enc is held as d_sae rows (as SparseAutoencoder does).
            by_rows = held_transposed(W_enc_DF)
            if grad_N.device.type != "cpu":
                product_FD = scatter_outer(code, grad_N, x_BD - b_dec_D)
                grad_W_enc = product_FD.T if by_rows else product_FD.T.contiguous()
            elif by_rows:
                grad_W_enc = spare.empty(W_enc_DF.shape, grad_N.dtype, grad_N.device, W_enc_DF.stride())
                scatter_outer(code, grad_N, x_BD - b_dec_D, out_FD=grad_W_enc.T)
            else:
                product_FD = scatter_outer(code, grad_N, x_BD - b_dec_D)
                grad_W_enc = spare.empty(W_enc_DF.shape, grad_N.dtype, grad_N.device).copy_(product_FD.T)
                spare.keep(product_FD)
                del product_FD
        grad_b_dec = None
        if ctx.needs_input_grad[3]:
            grad_b_dec = -(weighted_row_sum(W_enc_DF.T, grad_b_enc) if held_transposed(W_enc_DF) else W_enc_DF @ grad_b_enc)
        return None, None, None, grad_b_dec, grad_W_enc, grad_b_enc
