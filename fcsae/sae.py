"""SparseAutoencoder: ``relu`` (L1-penalised), ``topk``, ``batchtopk`` and ``matryoshka`` SAEs with a fast sparse path.

Parameters follow SAELens names and shapes: ``W_enc`` [D, F], ``b_enc`` [F],
``W_dec`` [F, D], ``b_dec`` [D]. Inputs are centred by ``b_dec`` before the
encoder (``pre = (x - b_dec) @ W_enc + b_enc``) and ``b_dec`` is added back after
the decoder.

``W_enc`` is stored transposed in memory (a [D, F] view of a contiguous [F, D]
tensor) so that one latent's encoder direction is a contiguous row: the fast
TopK backward gathers and scatters encoder rows exactly like decoder rows, and
its gradient comes out in the parameter's own layout. The trainer's
``LayoutAdam`` hands that layout to the fused Adam kernel without the strided
copy plain ``torch.optim.Adam`` makes of it. Files hold the SAELens layout
(``W_enc`` [D, F] row-major), so the in-memory layout never reaches disk.

The large per-step tensors (the [B, F] pre-activations, the [F, D] weight
gradients) are reused across steps (``_Workspace``; the trainer hands the
gradients back with ``recycle_grads`` after the optimiser step) rather than
allocated fresh, which costs their page faults every step.

The fast TopK path (``fast=True``, the default) runs one dense encoder matmul
and then touches only the k active latents: the decoder is an
``embedding_bag`` over the active rows, and the custom ``_TopKEncode`` backward
forms the encoder gradient as a sparse [F, B] x dense [B, D] product instead of
a dense [D, B] x [B, F] one. ``fast=False`` is the plain dense reference
(scatter into a [B, F] matrix, dense decoder) used by tests and the benchmark.

The sparse backward is fused across encoder and decoder (``_Layout``): the
kept (token, latent) pairs are sorted by latent once per forward and that CSR
layout serves both weight gradients (sparse [F, B] x dense [B, D] products);
the gradient of the kept activations is a sampled dense-dense product
(``torch.sparse.sampled_addmm``, no [B, k, D] gather); ``b_dec``'s gradient
through the encoder is ``-(grad b_enc) @ W_enc^T`` (an [F] x [F, D] product
instead of a [B, k, D] gather). AuxK's top-k runs over the dead columns only.

``encoder_bf16`` (set by the trainer from ``TrainerConfig.bf16_encoder``)
computes the dense pre-activations in bfloat16, which only selects the kept
latents: their values are recomputed in fp32 from the same pairs, so
activations, losses and gradients stay fp32 (the selection can differ from
fp32's where two pre-activations are within bf16 rounding of each other).

``batchtopk`` and ``matryoshka`` keep the ``round(k x B)`` largest
pre-activations of the whole batch during training (``forward``); a token's
kept latents are returned as a [B, K] block padded with zero activations, K
the most any token kept, so every consumer of ``acts_BK``/``idx_BK`` reads them
as it reads TopK's; the sparse products skip the padding (``_Layout``'s
``counts_B``), so uneven rows cost what their kept pairs cost. At inference
(``encode``) the code is batch-independent: ``relu(pre) * (pre > threshold)``
with ``threshold`` the EMA (decay ``trainer.threshold_decay``) of the smallest
kept activation per training batch, updated by ``update_threshold``. ``matryoshka`` also returns the
reconstruction of every nested prefix of the dictionary from the same kept
activations (``prefix_recons_BLD``), decoded in one ``embedding_bag`` over
(token, group) bags and summed cumulatively.

Layout on disk (``save``/``load``): ``sae_weights.safetensors`` (the four
parameters, plus any ``extra_tensors`` a caller passes under a prefix, e.g. the
tracker state as ``tracker.*``) and ``cfg.json`` (SAELens-like keys ``d_in``,
``d_sae``, ``architecture``, ``k``, ``apply_b_dec_to_input`` plus our
``SAEConfig`` under ``fcsae``). ``batchtopk``/``matryoshka`` SAEs are saved as
SAELens loads them, as JumpReLU SAEs (``architecture: jumprelu``, a per-latent
``threshold`` tensor), as SAELens itself saves its BatchTopK SAEs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fcsae.config import BATCH_ACTIVATIONS, SAEConfig, from_dict
from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path, write_json

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class ForwardOutput(NamedTuple):
    """What one forward pass returns (the contract shared with the tracker and trainer)."""

    recon_BD: torch.Tensor
    """Reconstruction of the input."""
    acts_BK: torch.Tensor | None
    """TopK: values of the k active latents (after ReLU); None for relu."""
    idx_BK: torch.Tensor | None
    """TopK: indices of the k active latents; None for relu."""
    latents_BF: torch.Tensor | None
    """relu and the dense batchtopk/matryoshka reference: dense latent activations; else None."""
    prefix_recons_BLD: torch.Tensor | None = None
    """matryoshka: reconstruction by each nested prefix [B, levels, D] (the last = ``recon_BD``); else None."""
    layout: "_Layout | None" = None
    """Fast path: the kept pairs ``idx_BK`` sorted by latent (``_Layout.sorted``), shared by the backward and the
    tracker; else None."""


class AuxOutput(NamedTuple):
    """TopK auxiliary (AuxK) latents: the top pre-activations among dead latents."""

    acts_BA: torch.Tensor
    """Values (after ReLU) of the auxiliary latents."""
    idx_BA: torch.Tensor
    """Indices of the auxiliary latents (all dead)."""
    layout: "_Layout | None" = None
    """Fast path: the pairs' sorted layout, shared with the encoder's backward."""


class _Layout:
    """The (token, latent) pairs ``idx_BN`` of one forward, sorted by latent once (lazily) for every backward that needs it.

    ``scatter`` is the weight gradient of a row gather (``out[r] = sum of
    w[b, n] * y[b] over idx[b, n] == r``) as a CSR [R, B] x dense [B, D] product,
    the CSR built directly from the sort (no COO coalesce; CSR @ dense was about
    2x COO on this CPU), written into a caller's buffer when given (a fresh
    [R, D] result costs its page faults: 45 vs 104 ms at 16,384 x 576 here);
    ``dots`` is ``out[b, n] = <y[b], M[idx[b, n]]>`` as a sampled dense-dense
    product over the latent-sorted pairs (each row of ``M`` read once: 63 vs
    169 ms in token order at 4,096 x 64 pairs, 576 wide). The sort is stable, so
    within a latent the pairs keep batch order and every sum over them is
    deterministic (the tracker reuses it: ``sorted``).

    ``counts_B`` (batch top-k's ragged rows): only the first ``counts_B[b]``
    pairs of row b are real; the padding after them is left out of every
    product, so the cost follows the kept pairs, not B x the longest row.
    """

    def __init__(self, idx_BN: torch.Tensor, n_rows: int, counts_B: torch.Tensor | None = None):
        self.idx_BN, self.n_rows, self.counts_B = idx_BN, n_rows, counts_B
        self._sorted = None
        self._real = None

    def real(self) -> torch.Tensor | None:
        """Flat positions (into ``idx_BN``) of the real pairs in batch order, or None when every pair is real."""
        if self.counts_B is None:
            return None
        if self._real is None:
            N = self.idx_BN.shape[1]
            mask_BN = torch.arange(N, device=self.idx_BN.device)[None, :] < self.counts_B[:, None]
            self._real = mask_BN.reshape(-1).nonzero().squeeze(1)
        return self._real

    def flat(self, *per_pair_BN: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor shaped like ``idx_BN`` (``idx_BN`` itself first), flattened to its real pairs in batch order."""
        real = self.real()
        flats = (self.idx_BN.reshape(-1),) + tuple(t.reshape(-1) for t in per_pair_BN)
        return flats if real is None else tuple(t[real] for t in flats)

    def bag(self, W_RD: torch.Tensor, w_BN: torch.Tensor) -> torch.Tensor:
        """``out[b] = sum over the real pairs n of row b of w[b, n] * W[idx[b, n]]`` (an ``embedding_bag``)."""
        if self.counts_B is None:
            return F.embedding_bag(self.idx_BN, W_RD, per_sample_weights=w_BN, mode="sum")
        offsets_B = torch.zeros_like(self.counts_B)
        torch.cumsum(self.counts_B[:-1], 0, out=offsets_B[1:])
        idx_N, w_N = self.flat(w_BN)
        return F.embedding_bag(idx_N, W_RD, offsets_B, per_sample_weights=w_N, mode="sum")

    def sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order, crow, col)``: flat pair positions in latent order, CSR row pointers over latents, each pair's token."""
        if self._sorted is None:
            N = self.idx_BN.shape[1]
            (flat,), real = self.flat(), self.real()
            keys = flat.int() if self.n_rows < 2 ** 31 else flat  # int32 keys sort faster
            order = torch.sort(keys, stable=True).indices
            if real is not None:
                order = real[order]  # back to positions in the padded block
            crow = torch.zeros(self.n_rows + 1, dtype=torch.long, device=flat.device)
            torch.cumsum(torch.bincount(flat, minlength=self.n_rows), 0, out=crow[1:])
            self._sorted = (order, crow, torch.div(order, N, rounding_mode="floor"))
        return self._sorted

    def scatter(self, w_BN: torch.Tensor, y_BD: torch.Tensor, out_RD: torch.Tensor | None = None,
                accumulate: bool = True) -> torch.Tensor:
        """``sum over (b, n) with idx[b, n] == r of w[b, n] * y[b]`` per row r, into ``out_RD`` when given
        (added to its contents when ``accumulate``, else overwriting them)."""
        order, crow, col = self.sorted()
        m_RB = _csr(crow, col, w_BN.reshape(-1)[order], (self.n_rows, self.idx_BN.shape[0]))
        if out_RD is None:
            return m_RB @ y_BD
        return torch.addmm(out_RD, m_RB, y_BD, beta=1.0 if accumulate else 0.0, out=out_RD)

    def dots(self, y_BD: torch.Tensor, M_RD: torch.Tensor) -> torch.Tensor:
        """``<y[b], M[idx[b, n]]>`` for every pair, shaped like ``idx_BN``."""
        order, crow, col = self.sorted()
        mask_RB = _csr(crow, col, y_BD.new_zeros(order.numel()), (self.n_rows, self.idx_BN.shape[0]))
        vals_N = torch.sparse.sampled_addmm(mask_RB, M_RD, y_BD.t()).values()
        # Padding pairs (ragged rows) are in no product: their entries stay 0.
        out = vals_N.new_zeros(self.idx_BN.numel()) if self.counts_B is not None else torch.empty_like(vals_N)
        out[order] = vals_N
        return out.view(self.idx_BN.shape)


class _Workspace:
    """Large buffers an SAE reuses across steps instead of allocating them fresh (first touch of a fresh
    [B, F] or [F, D] tensor costs its page faults every step).

    ``take`` hands a buffer out (the workspace keeps no reference, so a gradient
    returned from a backward is owned by the parameter, not copied); ``give``
    takes one back. A buffer of another shape, dtype or device is replaced.
    """

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, key: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._bufs.pop(key, None)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def give(self, key: str, buf: torch.Tensor | None) -> None:
        if buf is not None and buf.is_contiguous():
            self._bufs[key] = buf

    def clear(self) -> None:
        self._bufs.clear()


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        # torch warns that CSR is "beta"; the ops used here are tested against the dense reference.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, val, size, check_invariants=False)


class _Layouts:
    """Filled by ``_TopKEncode.forward``: the layouts of the kept and of the AuxK pairs, for the decoders' backward."""

    main: _Layout | None = None
    aux: _Layout | None = None


def dead_topk(pre_BF: torch.Tensor, dead_mask_F: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``a`` largest pre-activations of each row among the dead columns only (AuxK), with their column indices.

    Restricting the top-k to the dead columns gives the same result as masking
    the live ones to -inf over the full width, at the cost of the dead columns.
    """
    dead_G = dead_mask_F.nonzero().squeeze(1)
    vals_BA, j_BA = pre_BF.index_select(1, dead_G).topk(a, dim=1, sorted=False)
    return vals_BA, dead_G[j_BA]


class _TopKEncode(torch.autograd.Function):
    """Dense encoder matmul + top-k (or batch top-k; optionally top-a among dead latents), with a sparse backward.

    Gradients flow only into the selected (latent, token) pairs, so the
    backward never builds a [B, F] matrix (see the module docstring).
    """

    @staticmethod
    def forward(ctx, x_BD, b_dec_D, W_encT_FD, b_enc_F, k, dead_mask_F, auxk, batch_n, layouts, bf16, ws):
        xc_BD = x_BD - b_dec_D
        n_lat = W_encT_FD.shape[0]
        # The [B, F] pre-activations live only inside this forward: one reused buffer.
        pre_BF = ws.take("pre", (xc_BD.shape[0], n_lat), torch.bfloat16 if bf16 else xc_BD.dtype, xc_BD.device)
        if bf16:
            # bf16 only ranks the latents; the kept values are recomputed in fp32 below.
            torch.addmm(b_enc_F.to(torch.bfloat16), xc_BD.to(torch.bfloat16), W_encT_FD.to(torch.bfloat16).t(), out=pre_BF)
        else:
            torch.addmm(b_enc_F, xc_BD, W_encT_FD.t(), out=pre_BF)
        m_B = None
        if batch_n:
            vals_BK, idx_BK, m_B = batch_topk(pre_BF, batch_n, k, with_counts=True)
        else:
            vals_BK, idx_BK = pre_BF.topk(k, dim=1, sorted=False)
        if dead_mask_F is not None and auxk > 0:
            aux_vals_BA, aux_idx_BA = dead_topk(pre_BF, dead_mask_F, auxk)
        else:
            aux_vals_BA = xc_BD.new_zeros(xc_BD.shape[0], 0)
            aux_idx_BA = idx_BK.new_zeros(xc_BD.shape[0], 0)
        ws.give("pre", pre_BF)
        main, aux = _Layout(idx_BK, n_lat, m_B), _Layout(aux_idx_BA, n_lat)
        if bf16:
            vals_BK = main.dots(xc_BD, W_encT_FD) + b_enc_F[idx_BK]
            if m_B is not None:  # batch top-k pads short rows with zero activations
                vals_BK.masked_fill_(torch.arange(idx_BK.shape[1], device=idx_BK.device)[None, :] >= m_B[:, None], 0.0)
            if aux_idx_BA.shape[1] > 0:
                aux_vals_BA = aux.dots(xc_BD, W_encT_FD) + b_enc_F[aux_idx_BA]
        layouts.main, layouts.aux = main, aux
        ctx.layouts, ctx.ws = (main, aux), ws
        ctx.save_for_backward(xc_BD, W_encT_FD)
        ctx.mark_non_differentiable(idx_BK, aux_idx_BA)
        return vals_BK, idx_BK, aux_vals_BA, aux_idx_BA

    @staticmethod
    def backward(ctx, g_vals_BK, _g_idx, g_aux_BA, _g_aux_idx):
        xc_BD, W_encT_FD = ctx.saved_tensors
        main, aux = ctx.layouts
        n_lat = W_encT_FD.shape[0]
        if g_vals_BK is None:
            g_vals_BK = xc_BD.new_zeros(main.idx_BN.shape)
        parts = [(main, g_vals_BK)]
        if aux.idx_BN.shape[1] > 0 and g_aux_BA is not None:
            parts.append((aux, g_aux_BA))
        need_x, need_bdec, need_W, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_bdec = grad_W = grad_b = None
        if need_b or need_bdec:
            grad_b = xc_BD.new_zeros(n_lat)
            for lay, g in parts:
                grad_b.index_add_(0, *lay.flat(g))
        if need_W:
            grad_W = ctx.ws.take("grad.W_enc", tuple(W_encT_FD.shape), W_encT_FD.dtype, W_encT_FD.device)
            main.scatter(g_vals_BK, xc_BD, out_RD=grad_W, accumulate=False)
            for lay, g in parts[1:]:
                lay.scatter(g, xc_BD, out_RD=grad_W)
        if need_bdec:
            # d pre[b, f] / d b_dec = -W_enc[:, f]: summed over the pairs that is -(grad b_enc) @ W_enc^T.
            grad_bdec = -(grad_b @ W_encT_FD)
        if need_x:
            grad_x = sum(lay.bag(W_encT_FD, g) for lay, g in parts)
        return grad_x, grad_bdec, grad_W, grad_b if need_b else None, None, None, None, None, None, None, None


class _SparseDecode(torch.autograd.Function):
    """``sum_n acts[b, n] * W_dec[idx[b, n]]`` (an ``embedding_bag``) whose backward reuses the encoder's sorted layout
    (and writes ``W_dec``'s gradient into the workspace's buffer when ``ws`` is given)."""

    @staticmethod
    def forward(ctx, acts_BN, W_dec_FD, layout, ws):
        ctx.layout, ctx.ws = layout, ws
        ctx.save_for_backward(acts_BN, W_dec_FD)
        return layout.bag(W_dec_FD, acts_BN)

    @staticmethod
    def backward(ctx, g_BD):
        acts_BN, W_dec_FD = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        grad_acts = ctx.layout.dots(g_BD, W_dec_FD) if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[1]:
            buf = None if ctx.ws is None else ctx.ws.take("grad.W_dec", tuple(W_dec_FD.shape), W_dec_FD.dtype, W_dec_FD.device)
            grad_W = ctx.layout.scatter(acts_BN, g_BD, out_RD=buf, accumulate=False)
        return grad_acts, grad_W, None, None


def batch_topk(pre_BF: torch.Tensor, n: int, k: float, with_counts: bool = False):
    """The ``n`` largest entries of the whole batch, as per-row blocks [B, K] padded with zeros.

    Row b keeps its ``m_b`` largest pre-activations (``sum_b m_b = n``), in its
    first ``m_b`` columns; K is the largest ``m_b``. Padding values are 0 (so ReLU
    and every ``acts > 0`` test drop them) and padding indices are columns of
    the row that it did not keep (a scatter of the block never overwrites a kept
    value). ``with_counts`` also returns ``m_B``: the sparse path then skips the
    padding (``_Layout``), so a batch whose busiest token keeps 1,000 latents
    costs the same as one with even rows.

    Exactness without a [B*F] top-n: take each row's top ``cap`` candidates;
    the n-th largest candidate ``t`` is at most the batch's true threshold, so a
    row whose last candidate is below ``t`` already holds all it keeps; the few
    rows whose candidates all reach ``t`` are sorted whole, and the top n is
    taken over both (one extra pass, however uneven the rows).
    """
    B, Fn = pre_BF.shape
    dev = pre_BF.device
    cap = min(Fn, max(4 * math.ceil(k), -(-n // B)))
    vals_BC, idx_BC = pre_BF.topk(cap, dim=1, sorted=True)
    top = vals_BC.reshape(-1).topk(n, sorted=False)
    rows_N = torch.div(top.indices, cap, rounding_mode="floor")
    full_S = (vals_BC[:, -1] >= top.values.min()).nonzero().squeeze(1) if cap < Fn else rows_N[:0]
    if full_S.numel():
        full_vals_SF, full_idx_SF = pre_BF.index_select(0, full_S).sort(dim=1, descending=True)
        cand = torch.cat([vals_BC.index_fill(0, full_S, float("-inf")).reshape(-1), full_vals_SF.reshape(-1)])
        pos_N = cand.topk(n, sorted=False).indices
        in_full = pos_N >= B * cap
        rows_N = torch.where(in_full, full_S[(pos_N - B * cap).clamp_min(0) // Fn],
                             torch.div(pos_N, cap, rounding_mode="floor"))
    # Ties at the threshold could pick a later column: count per row, then take the row's first m_b.
    m_B = torch.bincount(rows_N, minlength=B)
    K = max(1, int(m_B.max()))
    Kc = min(K, cap)
    # Columns past a row's cap: its last candidate, which a row that is not sorted whole never keeps.
    idx_BK = idx_BC[:, cap - 1:cap].expand(B, K).clone()
    idx_BK[:, :Kc] = idx_BC[:, :Kc]
    vals_BK = vals_BC.new_zeros(B, K)
    vals_BK[:, :Kc] = vals_BC[:, :Kc]
    if full_S.numel():
        idx_BK[full_S] = full_idx_SF[:, :K]
        vals_BK[full_S] = full_vals_SF[:, :K]
    vals_BK[torch.arange(K, device=dev)[None, :] >= m_B[:, None]] = 0.0
    if with_counts:  # m_B: how many of each row's K entries are real
        return vals_BK, idx_BK, m_B
    return vals_BK, idx_BK


def batch_n(k: float, batch: int) -> int:
    """Activations a batchtopk SAE keeps in a batch of ``batch`` tokens: ``round(k x batch)``, at least 1."""
    return max(1, round(k * batch))


def scatter_rows(idx_BN: torch.Tensor, w_BN: torch.Tensor, y_BD: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``out[r] = sum over (b, n) with idx[b, n] == r of w[b, n] * y[b]`` (see ``_Layout.scatter``)."""
    return _Layout(idx_BN, n_rows).scatter(w_BN, y_BD)


def geometric_median(x_ND: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of ``x_ND`` by Weiszfeld's iteration (starting at the mean)."""
    x_ND = x_ND.float()
    median_D = x_ND.mean(0)
    for _ in range(iters):
        w_N = 1.0 / (x_ND - median_D).norm(dim=1).clamp_min(eps)
        new_D = (w_N[:, None] * x_ND).sum(0) / w_N.sum()
        if (new_D - median_D).norm() <= eps * (1 + median_D.norm()):
            return new_D
        median_D = new_D
    return median_D


class _PrefixDecode(torch.autograd.Function):
    """Matryoshka: the reconstruction by each nested prefix without ``b_dec``, ``out[b, l] = sum of acts[b, n] *
    W_dec[idx[b, n]]`` over the pairs whose latent is in groups 0..l ([B, L, D]).

    The forward is one ``embedding_bag`` over (token, group) bags. The backward reuses the encoder's latent-sorted
    layout: groups are contiguous latent ranges, so each group's pairs are one slice of the CSR, and ``W_dec``'s
    gradient and the activations' are one sparse x dense product and one sampled product per group (against that
    group's gradient rows), instead of autograd's ``embedding_bag`` backward over every pair. The running sums over
    the levels are written in place, forward and backward (``cumsum`` over the middle dimension and its backward's
    ``flip`` took 230 of 1,490 ms of a 4,096-latent step here).
    """

    @staticmethod
    def forward(ctx, acts_BN, W_dec_FD, layout, widths, ws):
        ctx.layout, ctx.widths, ctx.ws = layout, widths, ws
        ctx.save_for_backward(acts_BN, W_dec_FD)
        idx_BN = layout.idx_BN
        B, L = idx_BN.shape[0], len(widths)
        tok_BN = torch.arange(B, device=idx_BN.device)[:, None].expand_as(idx_BN)
        idx_N, acts_N, tok_N = layout.flat(acts_BN, tok_BN)
        bounds = torch.tensor(widths[:-1], dtype=idx_BN.dtype, device=idx_BN.device)
        bag_N = torch.bucketize(idx_N, bounds, right=True) + L * tok_N
        order = torch.argsort(bag_N, stable=True)
        offsets = torch.zeros(B * L, dtype=torch.long, device=idx_BN.device)
        torch.cumsum(torch.bincount(bag_N, minlength=B * L)[:-1], 0, out=offsets[1:])
        out_BLD = F.embedding_bag(idx_N[order], W_dec_FD, offsets, per_sample_weights=acts_N[order], mode="sum").view(B, L, -1)
        for level in range(1, L):
            out_BLD[:, level] += out_BLD[:, level - 1]
        return out_BLD

    @staticmethod
    def backward(ctx, g_BLD):
        acts_BN, W_dec_FD = ctx.saved_tensors
        lay, widths = ctx.layout, ctx.widths
        order, crow, col = lay.sorted()
        B = lay.idx_BN.shape[0]
        w_N = acts_BN.reshape(-1)[order]
        need_acts, need_W = ctx.needs_input_grad[:2]
        grad_acts = acts_BN.new_zeros(acts_BN.numel()) if need_acts else None
        grad_W = None
        if need_W:
            grad_W = W_dec_FD.new_empty(W_dec_FD.shape) if ctx.ws is None else \
                ctx.ws.take("grad.W_dec", tuple(W_dec_FD.shape), W_dec_FD.dtype, W_dec_FD.device)
        g_BD = torch.zeros_like(g_BLD[:, 0])
        for level, hi in reversed(list(enumerate(widths))):
            lo = widths[level - 1] if level > 0 else 0
            p0, p1 = int(crow[lo]), int(crow[hi])
            g_BD += g_BLD[:, level]  # group l's pairs reach every prefix from l on
            crow_l = crow[lo:hi + 1] - p0
            if need_W:
                m_RB = _csr(crow_l, col[p0:p1], w_N[p0:p1], (hi - lo, B))
                torch.addmm(grad_W[lo:hi], m_RB, g_BD, beta=0.0, out=grad_W[lo:hi])
            if need_acts and p1 > p0:
                mask_RB = _csr(crow_l, col[p0:p1], g_BD.new_zeros(p1 - p0), (hi - lo, B))
                grad_acts[order[p0:p1]] = torch.sparse.sampled_addmm(mask_RB, W_dec_FD[lo:hi], g_BD.t()).values()
        return grad_acts.view(acts_BN.shape) if need_acts else None, grad_W, None, None, None


class SparseAutoencoder(nn.Module):
    """One sparse autoencoder (see the module docstring for shapes and the fast path)."""

    def __init__(self, cfg: SAEConfig, fast: bool = True, seed: int = 0):
        """Initialise as in the field: unit-norm decoder rows, ``W_enc = W_dec.T``, zero biases.

        ``fast`` picks the sparse TopK path (ignored for relu); ``seed`` makes
        the initialisation reproducible without touching the global RNG.
        """
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise FcsaeInputError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.fast = fast
        self.encoder_bf16 = False
        """Fast path: rank latents by bf16 pre-activations (values stay fp32); set by the trainer."""
        self.workspace = _Workspace()
        """Fast path: the reused pre-activation and gradient buffers (see ``recycle_grads``)."""
        D, Fn = cfg.d_in, cfg.dict_size
        gen = torch.Generator().manual_seed(seed)
        W_dec_FD = torch.randn(Fn, D, generator=gen)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec = nn.Parameter(W_dec_FD.clone())
        # [D, F] view of a contiguous [F, D] tensor (see the module docstring).
        self.W_enc = nn.Parameter(W_dec_FD.clone().t())
        self.b_enc = nn.Parameter(torch.zeros(Fn))
        self.b_dec = nn.Parameter(torch.zeros(D))
        # Negative = not measured yet (encode is then a plain ReLU).
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.batch = cfg.activation in BATCH_ACTIVATIONS
        self.widths = cfg.matryoshka_widths if cfg.activation == "matryoshka" else None
        self.level_weights = cfg.matryoshka_level_weights if cfg.activation == "matryoshka" else None

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_b_dec(self, x_ND: torch.Tensor, method: str = "geometric_median") -> None:
        """Set ``b_dec`` to the geometric median (or ``mean``) of a sample batch of inputs."""
        if method == "geometric_median":
            self.b_dec.copy_(geometric_median(x_ND))
        elif method == "mean":
            self.b_dec.copy_(x_ND.float().mean(0))
        else:
            raise FcsaeInputError(f"b_dec init: must be geometric_median or mean, got {method!r}")

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit L2 norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component parallel to each decoder row (keeps norms at 1 to first order)."""
        if self.W_dec.grad is None:
            return
        W, G = self.W_dec, self.W_dec.grad
        # G -= (<G_i, W_i> / ||W_i||^2) W_i, without [F, D] temporaries (einsum reduces row-wise).
        coef_F = torch.einsum("fd,fd->f", G, W) / torch.einsum("fd,fd->f", W, W).clamp_min(1e-24)
        G.addcmul_(W, coef_F[:, None], value=-1.0)

    @torch.no_grad()
    def recycle_grads(self) -> None:
        """Drop ``W_enc``'s and ``W_dec``'s gradients, keeping their memory for the next fast backward to write into.

        For the trainer, after the optimiser step: the next gradients then land
        in the same buffers instead of fresh ones (whose page faults cost ~60 ms
        a step at 16,384 x 576 here). The gradients are set to None, so nothing
        can read a buffer the next backward overwrites.
        """
        sparse_fast = self.fast and self.cfg.activation != "relu"  # only the fast sparse backward takes them
        for key, p in (("grad.W_enc", self.W_enc), ("grad.W_dec", self.W_dec)):
            if p.grad is not None:
                if sparse_fast:
                    self.workspace.give(key, p.grad.t() if key == "grad.W_enc" else p.grad)
                p.grad = None

    # --------------------------------------------------------------- forward
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense encoder pre-activations [B, F]."""
        return torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [B, F] at inference: zeros outside the top k for topk, below the threshold for batchtopk/matryoshka.

        Each token's code depends on that token alone (batchtopk included).
        """
        pre_BF = self.pre_acts(x_BD)
        if self.cfg.activation == "relu":
            return F.relu(pre_BF)
        if self.batch:
            return pre_BF * (pre_BF > self.threshold.clamp_min(0))
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(1, idx_BK, F.relu(vals_BK))

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, D] from dense latents [B, F]."""
        return torch.addmm(self.b_dec, latents_BF, self.W_dec)

    def decode_sparse(self, acts_BK: torch.Tensor, idx_BK: torch.Tensor, bias: bool = True,
                      layout: _Layout | None = None, reuse_grad: bool = False) -> torch.Tensor:
        """Reconstruction [B, D] from the k active latents only (``embedding_bag`` over decoder rows).

        ``layout`` (the encoder's, for the same ``idx_BK``) makes the backward reuse its sort;
        ``reuse_grad`` (the one main decode of a step) writes ``W_dec``'s gradient into the workspace buffer.
        """
        if layout is not None:
            out_BD = _SparseDecode.apply(acts_BK, self.W_dec, layout, self.workspace if reuse_grad else None)
        else:
            out_BD = F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=acts_BK, mode="sum")
        return out_BD + self.b_dec if bias else out_BD

    def forward(self, x_BD: torch.Tensor) -> ForwardOutput:
        """Encode and decode ``x_BD``; see ``ForwardOutput``."""
        return self.forward_aux(x_BD)[0]

    def forward_aux(self, x_BD: torch.Tensor, dead_mask_F: torch.Tensor | None = None,
                    auxk: int = 0) -> tuple[ForwardOutput, AuxOutput | None]:
        """Training forward pass plus, for the k-sparse activations, the top ``auxk`` dead latents (for the AuxK loss).

        batchtopk/matryoshka select over the whole batch here (see the module
        docstring). The auxiliary part is None for relu, when ``auxk`` is 0, or
        when no latent is dead.
        """
        if self.cfg.activation == "relu":
            latents_BF = F.relu(self.pre_acts(x_BD))
            return ForwardOutput(self.decode(latents_BF), None, None, latents_BF), None
        n_dead = int(dead_mask_F.sum()) if dead_mask_F is not None else 0
        a = min(auxk, n_dead)
        n = batch_n(self.cfg.k, len(x_BD)) if self.batch else 0
        if self.fast:
            lay = _Layouts()
            vals_BK, idx_BK, aux_vals_BA, aux_idx_BA = _TopKEncode.apply(
                x_BD, self.b_dec, self.W_enc.t(), self.b_enc, self.cfg.k,
                dead_mask_F if a > 0 else None, a, n, lay, self.encoder_bf16, self.workspace)
            acts_BK = F.relu(vals_BK)
            if self.widths is not None:
                prefix_BLD = _PrefixDecode.apply(acts_BK, self.W_dec, lay.main, self.widths, self.workspace) + self.b_dec
                out = ForwardOutput(prefix_BLD[:, -1], acts_BK, idx_BK, None, prefix_BLD, lay.main)
            else:
                out = ForwardOutput(self.decode_sparse(acts_BK, idx_BK, layout=lay.main, reuse_grad=True),
                                    acts_BK, idx_BK, None, None, lay.main)
            aux = AuxOutput(F.relu(aux_vals_BA), aux_idx_BA, lay.aux) if a > 0 else None
            return out, aux
        pre_BF = self.pre_acts(x_BD)
        if self.batch:
            flat = pre_BF.reshape(-1).topk(n, sorted=False)
            latents_BF = torch.zeros_like(pre_BF).reshape(-1).scatter(0, flat.indices, F.relu(flat.values)).view_as(pre_BF)
            prefix_BLD = None
            if self.widths is not None:
                prefix_BLD = torch.stack([latents_BF[:, :w] @ self.W_dec[:w] + self.b_dec for w in self.widths], 1)
            out = ForwardOutput(self.decode(latents_BF), None, None, latents_BF, prefix_BLD)
        else:
            vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
            acts_BK = F.relu(vals_BK)
            latents_BF = torch.zeros_like(pre_BF).scatter(1, idx_BK, acts_BK)
            out = ForwardOutput(self.decode(latents_BF), acts_BK, idx_BK, None)
        if a == 0:
            return out, None
        # The reference keeps AuxK's full-width form (live latents masked to -inf), which dead_topk must equal.
        aux_vals_BA, aux_idx_BA = pre_BF.masked_fill(~dead_mask_F, float("-inf")).topk(a, dim=1, sorted=False)
        return out, AuxOutput(F.relu(aux_vals_BA), aux_idx_BA)

    @torch.no_grad()
    def update_threshold(self, out: ForwardOutput, decay: float = 0.99) -> None:
        """batchtopk/matryoshka: move the inference threshold toward this batch's smallest kept activation (EMA)."""
        acts = out.acts_BK if out.acts_BK is not None else out.latents_BF
        positive = acts[acts > 0]
        if positive.numel() == 0:
            return
        low = positive.min().to(self.threshold.dtype)
        if self.threshold < 0:
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(decay).add_((1 - decay) * low)

    def decode_aux(self, aux: AuxOutput) -> torch.Tensor:
        """Reconstruction of the residual by the auxiliary latents (no decoder bias)."""
        if self.fast:
            return self.decode_sparse(aux.acts_BA, aux.idx_BA, bias=False, layout=aux.layout)
        lat_BF = aux.acts_BA.new_zeros(aux.acts_BA.shape[0], self.cfg.dict_size).scatter(1, aux.idx_BA, aux.acts_BA)
        return lat_BF @ self.W_dec

    # ------------------------------------------------------------ save/load
    def cfg_dict(self) -> dict:
        """``cfg.json`` contents: SAELens-like keys plus our ``SAEConfig`` under ``fcsae``."""
        c = self.cfg
        return {
            "d_in": c.d_in, "d_sae": c.dict_size, "architecture": saelens_architecture(c.activation),
            "k": c.k if c.activation == "topk" else None,
            "apply_b_dec_to_input": True, "dtype": "float32",
            "fcsae": dataclasses.asdict(c),
        }

    def save(self, path: str | os.PathLike, extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` under ``path`` (each file atomically).

        ``extra_tensors`` (e.g. tracker state) are stored in the same safetensors
        file; their names must not collide with the parameter names.
        """
        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in PARAM_NAMES}
        if self.batch:
            tensors["threshold"] = torch.full_like(tensors["b_enc"], float(self.threshold))
        for name, t in (extra_tensors or {}).items():
            if name in tensors:
                raise FcsaeInputError(f"extra_tensors: name {name!r} collides with an SAE parameter")
            tensors[name] = t.detach().cpu().contiguous()
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        write_json(path / CFG_FILE, self.cfg_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: SAEConfig | None = None, fast: bool = True) -> "SparseAutoencoder":
        """Load an SAE saved by ``save``; refuse missing files, bad shapes or a config other than ``expect``."""
        sae, _ = cls.load_with_extras(path, expect=expect, fast=fast)
        return sae

    @classmethod
    def load_with_extras(cls, path: str | os.PathLike, expect: SAEConfig | None = None,
                         fast: bool = True) -> tuple["SparseAutoencoder", dict[str, torch.Tensor]]:
        """Like ``load``, also returning the extra tensors saved alongside the weights."""
        cfg = read_cfg(path)
        if expect is not None and expect != cfg:
            raise FcsaeInputError(f"{path}: saved SAE config {cfg} does not match the expected {expect}")
        try:
            tensors = load_file(str(Path(path) / WEIGHTS_FILE))
        except (OSError, SafetensorError) as e:
            raise FcsaeInputError(f"{Path(path) / WEIGHTS_FILE}: cannot read safetensors weights ({e})") from None
        sae = cls(cfg, fast=fast)
        with torch.no_grad():
            for name in PARAM_NAMES:
                param = getattr(sae, name)
                t = tensors.pop(name, None)
                if t is None:
                    raise FcsaeInputError(f"{path}: weights file lacks {name}")
                if tuple(t.shape) != tuple(param.shape):
                    raise FcsaeInputError(f"{path}: {name} has shape {tuple(t.shape)}, cfg.json implies {tuple(param.shape)}")
                param.copy_(t.to(param.dtype))
            if sae.batch:
                thr_F = tensors.pop("threshold", None)
                if thr_F is None or thr_F.shape != sae.b_enc.shape or not bool((thr_F == thr_F[0]).all()):
                    raise FcsaeInputError(f"{path}: a {cfg.activation} SAE needs one 'threshold' value per latent, all equal")
                sae.threshold.fill_(float(thr_F[0]))
        return sae, tensors


def saelens_architecture(activation: str) -> str:
    """The ``architecture`` SAELens loads an SAE of this activation as (batchtopk SAEs infer as JumpReLU)."""
    return "jumprelu" if activation in BATCH_ACTIVATIONS else activation


def read_cfg(path: str | os.PathLike) -> SAEConfig:
    """Read the ``SAEConfig`` from ``path/cfg.json``, checking the SAELens keys agree with it."""
    f = Path(path) / CFG_FILE
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise FcsaeInputError(f"{f}: no such file (not a saved SAE directory)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise FcsaeInputError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("fcsae"), dict):
        raise FcsaeInputError(f"{f}: missing the 'fcsae' section (not saved by fcsae)")
    cfg = from_dict(SAEConfig, raw["fcsae"], where="cfg.json fcsae.")
    if (raw.get("d_in"), raw.get("d_sae"), raw.get("architecture")) != (cfg.d_in, cfg.dict_size, saelens_architecture(cfg.activation)):
        raise FcsaeInputError(f"{f}: d_in/d_sae/architecture disagree with the fcsae section")
    return cfg


def bf16_encoder_pays(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 pre-activations are faster than fp32 here: CUDA with bf16 support, or a CPU with AMX-BF16 or
    AVX512-BF16 (measured 4.2x on the encoder matmul with AMX; on AVX2-only CPUs bf16 matmul is several times slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
