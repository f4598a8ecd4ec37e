"""Streaming per-latent frequency and consistency statistics (docs/design.md, "The method").

For each latent i the tracker keeps

- ``freq_F``: an EMA (decay ``ema_alpha``) of the fraction of the batch where
  ``|a_i| > tau_act``, bias-corrected per latent like Adam's moments (a latent
  reset ``n`` updates ago divides by ``1 - alpha**n``), so a fresh latent is not
  mistaken for a rare one;
- ``sum_FD``, ``sqsum_F``, ``weight_F``: sums over the inputs that activate the
  latent of ``w * x``, ``w * ||x||^2`` and ``w`` (``w`` = 1 or the activation
  value, see ``TrackerConfig.weighting``), decayed by ``ema_alpha`` per step
  (``horizon="ema"``) or not at all (``horizon="all"``);
- the whole-history data mean ``m`` (the data are stationary, so no decay).

Centring by the data mean happens at ``scores()`` time, exactly, from the
uncentred sums: sum(x - m) = sum(x) - W m and sum||x - m||^2 = sum||x||^2 -
2 m . sum(x) + W ||m||^2. That centres every input by the best current
estimate of the mean and keeps the per-step update to one sparse product.

The update is one CSR sparse-dense product ``S_FB @ x_BD`` accumulated in place
(``torch.addmm``): the (latent, input) pairs of a TopK batch are sorted by
latent once, so no [B*k, D] gather (the naive ``index_add_``) and never a
[B, F, D] tensor. Memory is O(F x D) whatever the batch. When the forward
output carries its layout (``ForwardOutput.layout``, the fast path in
training), the tracker takes the pairs in the order the backward already
sorted them (stable, batch order within a latent, as its own sort), so it pays
for no sort of its own; inactive pairs stay in with weight 0.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple, Sequence

import torch

from fcsae.config import CONSISTENCY, TrackerConfig
from fcsae.errors import FcsaeInputError, require

log = logging.getLogger(__name__)


class TrackerScores(NamedTuple):
    """Per-latent scores, all shaped [F]."""

    freq_F: torch.Tensor
    """Bias-corrected EMA of the firing fraction."""
    consistency_F: torch.Tensor
    """c_i in [0, 1] (1 where the latent has no tracked inputs yet)."""
    score_F: torch.Tensor
    """Absorption score s_i = f_i * (1 - c_i)."""
    count_F: torch.Tensor
    """Activating inputs behind the statistics (decayed with the horizon)."""


class ActiveEntries(NamedTuple):
    """The active (latent, input) pairs of one batch, sorted by latent (CSR layout over latents)."""

    crow_F1: torch.Tensor
    """Row pointers: the pairs of latent f are ``crow[f]:crow[f+1]``."""
    rows_N: torch.Tensor
    """Input (batch row) of each pair."""
    acts_N: torch.Tensor
    """Activation value of each pair."""
    counts_F: torch.Tensor
    """Number of active inputs per latent in this batch."""
    keep_N: torch.Tensor | None = None
    """Which pairs are active (|a| > tau_act) when the pairs include inactive ones (a forward's whole layout);
    None: all are."""


def active_counts(out, dict_size: int, tau_act: float) -> torch.Tensor:
    """Number of inputs per latent with ``|a| > tau_act`` in one batch (no sort: cheap enough for every step)."""
    if getattr(out, "idx_BK", None) is not None:
        return torch.bincount(out.idx_BK[out.acts_BK.detach().abs() > tau_act], minlength=dict_size)
    if getattr(out, "latents_BF", None) is not None:
        return (out.latents_BF.detach().abs() > tau_act).sum(0)
    raise FcsaeInputError("tracker.update: the forward output has neither idx_BK/acts_BK nor latents_BF")


def active_entries(out, dict_size: int, tau_act: float, counts_F: torch.Tensor | None = None) -> ActiveEntries:
    """Collect the pairs with ``|a| > tau_act`` from a ``ForwardOutput``, grouped by latent.

    TopK outputs use ``idx_BK``/``acts_BK``; dense (relu) outputs use the
    nonzeros of ``latents_BF``. Scanning the transposed mask yields pairs
    already ordered by latent, so only TopK pays for a sort, and not even it when the
    output carries the forward's sorted ``layout`` (then every pair is kept, the
    inactive ones marked by ``keep_N``). ``counts_F``:
    ``active_counts`` of the same output when the caller has it already.
    """
    if getattr(out, "idx_BK", None) is not None and getattr(out, "layout", None) is not None:
        # The forward's pairs, already sorted by latent for its backward: no second sort, no compaction;
        # inactive pairs stay in with zero weight (exact zeros in every sum).
        order, crow_F1, rows_N = out.layout.sorted()
        acts_N = out.acts_BK.detach().reshape(-1)[order]
        keep_N = acts_N.abs() > tau_act
        if counts_F is None:
            counts_F = torch.bincount(out.idx_BK.reshape(-1)[order][keep_N], minlength=dict_size)
        return ActiveEntries(crow_F1, rows_N, acts_N, counts_F, None if bool(keep_N.all()) else keep_N)
    if getattr(out, "idx_BK", None) is not None:
        acts_BK = out.acts_BK.detach()
        idx_BK = out.idx_BK
        keep_BK = acts_BK.abs() > tau_act
        k = idx_BK.shape[1]
        flat_idx = idx_BK.reshape(-1)
        flat_acts = acts_BK.reshape(-1)
        if bool(keep_BK.all()):
            rows = None
        else:
            keep = keep_BK.reshape(-1)
            pos = keep.nonzero().squeeze(1)
            flat_idx, flat_acts, rows = flat_idx[pos], flat_acts[pos], pos // k
        # A stable sort keeps inputs in batch order within a latent (deterministic sums); int32 keys sort faster.
        keys = flat_idx.int() if dict_size < 2 ** 31 else flat_idx
        order = torch.sort(keys, stable=True).indices
        rows_N = (order // k) if rows is None else rows[order]
        acts_N = flat_acts[order]
        if counts_F is None:
            counts_F = torch.bincount(flat_idx, minlength=dict_size)
    elif getattr(out, "latents_BF", None) is not None:
        lat_FB = out.latents_BF.detach().T
        f_N, rows_N = (lat_FB.abs() > tau_act).nonzero(as_tuple=True)
        acts_N = lat_FB[f_N, rows_N]
        counts_F = torch.bincount(f_N, minlength=dict_size)
    else:
        raise FcsaeInputError("tracker.update: the forward output has neither idx_BK/acts_BK nor latents_BF")
    crow_F1 = torch.zeros(dict_size + 1, dtype=torch.int64, device=counts_F.device)
    torch.cumsum(counts_F, 0, out=crow_F1[1:])
    return ActiveEntries(crow_F1, rows_N, acts_N, counts_F)


class FrequencyConsistencyTracker:
    """Per-latent firing frequency, input mean/variance, consistency and absorption score."""

    def __init__(self, cfg: TrackerConfig, dict_size: int, d_in: int, device: str | torch.device = "cpu"):
        """Zero statistics for ``dict_size`` latents over ``d_in``-dimensional inputs."""
        require(isinstance(dict_size, int) and dict_size >= 1, f"dict_size: must be an integer >= 1, got {dict_size!r}")
        require(isinstance(d_in, int) and d_in >= 1, f"d_in: must be an integer >= 1, got {d_in!r}")
        self.cfg = cfg
        self.dict_size = dict_size
        self.d_in = d_in
        F, D = dict_size, d_in
        self.freq_F = torch.zeros(F, device=device)
        self.updates_F = torch.zeros(F, dtype=torch.int64, device=device)
        self.sum_FD = torch.zeros(F, D, device=device)
        # Scalars per latent in float64: cheap, and the centring at scores() subtracts large terms.
        self.sqsum_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.weight_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.count_F = torch.zeros(F, dtype=torch.float64, device=device)
        self.data_sum_D = torch.zeros(D, dtype=torch.float64, device=device)
        self.data_n = torch.zeros((), dtype=torch.float64, device=device)
        self.n_updates = torch.zeros((), dtype=torch.int64, device=device)

    @property
    def data_mean_D(self) -> torch.Tensor:
        """Whole-history mean of the inputs seen (float32; zeros before the first update)."""
        return (self.data_sum_D / self.data_n.clamp_min(1.0)).float()

    @torch.no_grad()
    def update(self, out, x_BD: torch.Tensor) -> None:
        """Add one batch: ``out`` is the SAE's ``ForwardOutput`` on ``x_BD`` (the normalised inputs)."""
        B, D = x_BD.shape
        if D != self.d_in:
            raise FcsaeInputError(f"tracker.update: inputs have width {D}, the tracker was built for d_in={self.d_in}")
        alpha = self.cfg.ema_alpha
        x_BD = x_BD.detach().float()
        counts_F = active_counts(out, self.dict_size, self.cfg.tau_act)

        self.freq_F.mul_(alpha).add_(counts_F.float() / B, alpha=1.0 - alpha)
        self.updates_F.add_(1)
        self.data_sum_D.add_(x_BD.sum(0).double())  # float32 batch sum, float64 across batches
        self.data_n.add_(B)
        self.n_updates.add_(1)
        every = self.cfg.stats_every
        if every > 1 and int(self.n_updates) % every:
            return  # the sums take every ``stats_every``-th batch (the n-th, 2n-th, ...)
        ent = active_entries(out, self.dict_size, self.cfg.tau_act, counts_F)

        if self.cfg.weighting == "activation":
            w_N = ent.acts_N.float() if ent.keep_N is None else ent.acts_N.float() * ent.keep_N
        else:
            w_N = torch.ones_like(ent.acts_N, dtype=torch.float32) if ent.keep_N is None else ent.keep_N.float()
        decay = alpha ** every if self.cfg.horizon == "ema" else 1.0  # same horizon in steps whatever stats_every
        S_FB = _csr(ent.crow_F1, ent.rows_N, w_N, (self.dict_size, B))
        # In place: sum_FD = decay * sum_FD + S_FB @ x_BD (MKL's fused CSR path; ~4x faster than matmul + add).
        torch.addmm(self.sum_FD, S_FB, x_BD, beta=decay, out=self.sum_FD)
        sq_N = x_BD.pow(2).sum(1)[ent.rows_N].double()
        counts_d = ent.counts_F.double()
        if self.cfg.weighting == "activation":
            wd_N = w_N.double()
            self.sqsum_F.mul_(decay).add_(_segment_sums(wd_N * sq_N, ent.crow_F1))
            self.weight_F.mul_(decay).add_(_segment_sums(wd_N, ent.crow_F1))
        else:  # unit weights: the weight of a latent is its count
            self.sqsum_F.mul_(decay).add_(_segment_sums(sq_N if ent.keep_N is None else sq_N * ent.keep_N, ent.crow_F1))
            self.weight_F.mul_(decay).add_(counts_d)
        self.count_F.mul_(decay).add_(counts_d)

    @torch.no_grad()
    def scores(self, consistency: str | None = None) -> TrackerScores:
        """Frequency, consistency and absorption score of every latent, from the current statistics.

        ``consistency`` overrides the configured definition (``normalized`` or ``seed``): the detector panel
        reports both from the same sums.
        """
        consistency = consistency or self.cfg.consistency
        if consistency not in CONSISTENCY:
            raise FcsaeInputError(f"consistency: must be normalized or seed, got {consistency!r}")
        alpha = self.cfg.ema_alpha
        bias_F = 1.0 - torch.pow(torch.full_like(self.freq_F, alpha), self.updates_F.float())
        freq_F = torch.where(self.updates_F > 0, self.freq_F / bias_F.clamp_min(1e-12), torch.zeros_like(self.freq_F))

        W_F = self.weight_F
        has_F = W_F > 0
        Wsafe_F = torch.where(has_F, W_F, torch.ones_like(W_F))
        m_D = self.data_sum_D / self.data_n.clamp_min(1.0)
        mean_FD = self.sum_FD.double() / Wsafe_F[:, None]
        mean_sq_F = self.sqsum_F / Wsafe_F  # E||x||^2 over the latent's inputs
        mu_sq_F = (mean_FD - m_D).pow(2).sum(1)  # ||E x - m||^2 = ||mu_i||^2, centred
        trace_F = (mean_sq_F - mean_FD.pow(2).sum(1)).clamp_min(0.0)  # tr(Sigma_i), centring-invariant
        if consistency == "normalized":
            # E||x - m||^2 = tr(Sigma) + ||mu||^2, so c = ||mu||^2 / E||x - m||^2 lies in [0, 1].
            total_F = trace_F + mu_sq_F
            c_F = torch.where(total_F > 0, mu_sq_F / total_F.clamp_min(1e-30), torch.ones_like(total_F))
        else:
            c_F = 1.0 / (1.0 + trace_F / self.d_in)
        c_F = torch.where(has_F, c_F, torch.ones_like(c_F)).clamp(0.0, 1.0).float()
        return TrackerScores(freq_F, c_F, freq_F * (1.0 - c_F), self.count_F.float())

    @torch.no_grad()
    def reset(self, latent_ids: Sequence[int] | torch.Tensor) -> None:
        """Forget everything about these latents (after a split or resample); the data mean is kept."""
        ids = torch.as_tensor(latent_ids, dtype=torch.int64, device=self.freq_F.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.dict_size):
            raise FcsaeInputError(f"tracker.reset: latent ids must be in [0, {self.dict_size}), got {ids.tolist()}")
        for t in (self.freq_F, self.updates_F, self.sum_FD, self.sqsum_F, self.weight_F, self.count_F):
            t[ids] = 0

    _STATE = ("freq_F", "updates_F", "sum_FD", "sqsum_F", "weight_F", "count_F", "data_sum_D", "data_n", "n_updates")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All statistics as contiguous tensors (safetensors-friendly; no config inside)."""
        return {name: getattr(self, name).detach().clone().contiguous() for name in self._STATE}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()`` output; shapes and dtypes must match this tracker's."""
        missing = [n for n in self._STATE if n not in sd]
        if missing:
            raise FcsaeInputError(f"tracker state: missing tensor {missing[0]!r}; expected {', '.join(self._STATE)}")
        for name in self._STATE:  # check everything before touching anything: no half-loaded state
            cur, new = getattr(self, name), sd[name]
            if tuple(new.shape) != tuple(cur.shape):
                raise FcsaeInputError(f"tracker state: {name} has shape {tuple(new.shape)}, expected {tuple(cur.shape)} "
                                      f"(dict_size={self.dict_size}, d_in={self.d_in})")
        for name in self._STATE:
            getattr(self, name).copy_(sd[name].to(getattr(self, name).dtype))


def _segment_sums(v_N: torch.Tensor, crow_F1: torch.Tensor) -> torch.Tensor:
    """Sum of ``v_N`` over each latent's pairs ``crow[f]:crow[f+1]`` (a prefix sum, no [N] index tensor built)."""
    cs = torch.zeros(v_N.shape[0] + 1, dtype=v_N.dtype, device=v_N.device)
    torch.cumsum(v_N, 0, out=cs[1:])
    return cs[crow_F1[1:]] - cs[crow_F1[:-1]]


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from parts that are valid by construction (skip torch's beta-feature warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)
