"""Core metrics of one SAE: reconstruction, sparsity, and the SAE spliced into the model.

All metrics use held-out corpus tokens (``load_texts(eval_cfg.corpus,
split="test")`` packed to ``eval_cfg.context_len``); positions holding the
row-start token (BOS, or EOS where the tokenizer has no BOS) are excluded,
because their residual norms are an order of magnitude larger and the SAE is
never trained on them.

Reconstruction metrics are computed in the SAE's input space (raw residual x
``norm_scale``; scale-free metrics do not care):

- ``explained_variance`` = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2
  (mean per dimension over the eval tokens);
- ``mse`` = mean over tokens and dimensions of (x - x_hat)^2;
- ``cossim`` = mean cosine(x, x_hat); ``l2_ratio`` = mean ||x_hat|| / ||x||;
- ``relative_reconstruction_bias`` = E||x_hat||^2 / E[x . x_hat] (1 = unbiased,
  < 1 = shrinkage; eq. 10 of Rajamanoharan et al. 2024);
- ``l0`` / ``l1``: mean number / mean sum of absolute values of active latents;
- ``frac_dead``: latents that never fire on the eval tokens; ``frac_dense``:
  latents firing on more than 10% of them.

Spliced metrics replace ``blocks.{L}.hook_resid_post`` at every non-BOS
position by ``decode(encode(x_raw * s)) / s`` and compare next-token
predictions (positions whose token is BOS are not scored):
``ce_loss_score`` = (CE_zero - CE_sae) / (CE_zero - CE_clean) and
``kl_div_score`` = (KL_zero - KL_sae) / KL_zero, where "zero" sets the same
positions to 0.

What depends only on (model, layer, eval tokens) is cached once under
``$FCSAE_HOME/evals/core``: the tokens, the hook-point activations, per-position
clean and zero-ablated CE, the zero-ablated KL, and a compact form of the clean
distribution for KL. Because blocks 0..L do not depend on the SAE, each
spliced forward starts at block L+1 from the cached activations (the SAE
applied to them) instead of re-running the first L+1 blocks; a test checks
that this equals the full forward with the splice hook. The
clean log-probabilities over a 49k-262k vocabulary are too large to keep
(16k tokens x 49k x 2 bytes = 1.6 GB), so the cache keeps the clean top-k
log-probs (``kl_topk``, default 64) and KL is computed on the coarsened
distribution (those k tokens + one "rest" bucket). By the data-processing
inequality this is a lower bound of the exact KL; both KL_sae and KL_zero use
it, so their ratio stays consistent. ``kl_topk=0`` computes KL exactly instead
(the clean logits are recomputed per trial: one extra forward pass).
docs/evals.md reports the measured error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fcsae.config import EvalConfig, LMConfig
from fcsae.errors import FcsaeInputError
from fcsae.evals import store

log = logging.getLogger(__name__)

KIND = "core"
DENSE_FRACTION = 0.1
"""A latent firing on more than this fraction of eval tokens counts as dense."""


class CoreBaseline(NamedTuple):
    """The per-(model, layer, eval tokens) part of the core eval, computed once and cached."""

    tokens_NT: torch.Tensor
    """Eval tokens, one packed context per row (int64)."""
    skip_NT: torch.Tensor
    """True at row-start (BOS) positions: not spliced, not scored."""
    ce_clean_NS: torch.Tensor
    """Clean next-token CE at positions 0..T-2 (S = T-1)."""
    ce_zero_NS: torch.Tensor
    """CE with the hook zero-ablated at non-BOS positions."""
    kl_zero_NS: torch.Tensor
    """KL(clean || zero-ablated) in the cache's KL approximation (exact when ``kl_topk`` is 0)."""
    kl_zero_exact_NS: torch.Tensor
    """Exact KL(clean || zero-ablated), kept to report the approximation's error."""
    topk_idx_NSK: torch.Tensor | None
    """Clean top-k token ids per position (int32), or None when ``kl_topk`` is 0."""
    topk_logp_NSK: torch.Tensor | None
    """Clean log-probabilities of those tokens (float32), or None."""
    resid_NTD: torch.Tensor
    """Activations at ``blocks.{L}.hook_resid_post`` (the model's dtype): the spliced forward starts after them."""


# ------------------------------------------------------------------ pure metric helpers


class ReconAccumulator:
    """Streaming sums for the reconstruction and sparsity metrics (float64, any number of batches)."""

    def __init__(self, d_in: int, dict_size: int):
        """Empty sums for inputs of width ``d_in`` and ``dict_size`` latents."""
        self.n = 0
        self.d_in = d_in
        self.sum_x_D = torch.zeros(d_in, dtype=torch.float64)
        self.sums = dict.fromkeys(("x_sq", "resid_sq", "cos", "l2_ratio", "xhat_sq", "x_dot_xhat", "l0", "l1"), 0.0)
        self.fires_F = torch.zeros(dict_size, dtype=torch.float64)

    def update(self, x_ND: torch.Tensor, recon_ND: torch.Tensor, latents_NF: torch.Tensor) -> None:
        """Add one batch of inputs, reconstructions and dense latents (rows are tokens)."""
        x, r, lat = x_ND.double().cpu(), recon_ND.double().cpu(), latents_NF.double().cpu()
        xn, rn = x.norm(dim=1), r.norm(dim=1)
        s = self.sums
        s["x_sq"] += float((xn ** 2).sum())
        s["resid_sq"] += float(((x - r) ** 2).sum())
        s["cos"] += float(((x * r).sum(1) / (xn * rn).clamp_min(1e-12)).sum())
        s["l2_ratio"] += float((rn / xn.clamp_min(1e-12)).sum())
        s["xhat_sq"] += float((rn ** 2).sum())
        s["x_dot_xhat"] += float((x * r).sum())
        active = lat != 0
        s["l0"] += float(active.sum())
        s["l1"] += float(lat.abs().sum())
        self.fires_F += active.sum(0).double()
        self.sum_x_D += x.sum(0)
        self.n += x.shape[0]

    def result(self) -> dict[str, float]:
        """The metrics over everything added so far (see the module docstring)."""
        n, s = self.n, self.sums
        if n == 0:
            raise FcsaeInputError("core eval: no non-BOS tokens to score (core_tokens too small?)")
        total_var = s["x_sq"] - float((self.sum_x_D ** 2).sum()) / n
        return {
            "explained_variance": 1.0 - s["resid_sq"] / total_var if total_var > 0 else float("nan"),
            "mse": s["resid_sq"] / (n * self.d_in),
            "cossim": s["cos"] / n,
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"] if s["x_dot_xhat"] else float("nan"),
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "frac_dead": float((self.fires_F == 0).double().mean()),
            "frac_dense": float((self.fires_F / n > DENSE_FRACTION).double().mean()),
            "n_tokens": float(n),
        }


def kl_topk(topk_idx_NK: torch.Tensor, topk_logp_NK: torch.Tensor, logq_NV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) on the coarsened distributions (p's top-k tokens + one bucket for the rest), per row.

    ``topk_logp_NK`` are p's log-probs on ``topk_idx_NK``; ``logq_NV`` are q's
    full log-probs. A lower bound of the exact KL (data-processing inequality),
    equal to it when k covers the vocabulary.
    """
    # float64: the rest bucket is 1 - sum(p), a difference of nearly equal numbers.
    logp = topk_logp_NK.double()
    logq = logq_NV.gather(1, topk_idx_NK.long()).double()
    p = logp.exp()
    head = (p * (logp - logq)).sum(1)
    p_rest = (1 - p.sum(1)).clamp_min(0)
    q_rest = (1 - logq.exp().sum(1)).clamp_min(1e-30)
    tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (head + tail).float()


def kl_exact(logp_NV: torch.Tensor, logq_NV: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) per row from full log-probabilities."""
    return (logp_NV.exp() * (logp_NV - logq_NV)).sum(1)


def downstream_scores(ce_clean: float, ce_sae: float, ce_zero: float, kl_sae: float, kl_zero: float) -> dict[str, float]:
    """CE-loss score and KL score from mean losses (NaN where the denominator vanishes)."""
    ce_den = ce_zero - ce_clean
    return {
        "ce_loss_score": (ce_zero - ce_sae) / ce_den if ce_den != 0 else float("nan"),
        "kl_div_score": (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan"),
    }


# ------------------------------------------------------------------ model runs


def _skip_mask(lm, tokens_NT: torch.Tensor) -> torch.Tensor:
    from fcsae.corpus import bos_choice

    skip = tokens_NT == bos_choice(lm.tokenizer).token_id
    skip[:, 0] = True
    return skip


def eval_tokens(lm, eval_cfg: EvalConfig) -> torch.Tensor:
    """Held-out tokens ``[N, context_len]``: enough packed rows for ``core_tokens`` non-BOS positions."""
    from fcsae import corpus

    rows = math.ceil(eval_cfg.core_tokens / (eval_cfg.context_len - 1))
    tokens = corpus.pack(corpus.iter_texts(eval_cfg.corpus, split="test"), lm.tokenizer, eval_cfg.context_len,
                         max_rows=rows)
    if tokens.shape[0] == 0:
        raise FcsaeInputError(f"corpus: the test split of {eval_cfg.corpus!r} has too little text for one "
                              f"context of {eval_cfg.context_len} tokens")
    if tokens.shape[0] < rows:
        log.warning("core eval: the test split gives only %d contexts (%d wanted)", tokens.shape[0], rows)
    return tokens


def _logits(lm, tokens_BT: torch.Tensor, hook=None, layer: int | None = None) -> torch.Tensor:
    from fcsae.lm import hook_name

    device = lm.model.cfg.device
    tokens_BT = tokens_BT.to(device)
    if hook is None:
        return lm.model(tokens_BT, return_type="logits")
    return lm.model.run_with_hooks(tokens_BT, return_type="logits", fwd_hooks=[(hook_name(layer), hook)])


def _next_token_logp(logits_BTV: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits_BTV[:, :-1].float(), dim=-1)


def _ce(logp_BSV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    return -logp_BSV.gather(2, tokens_BT[:, 1:, None].to(logp_BSV.device)).squeeze(2)


def _capture_hook(store_list: list):
    def hook(act_BTD, hook=None):
        store_list.append(act_BTD.detach().cpu().clone())
    return hook


@contextlib.contextmanager
def _skipping_blocks(lm, n: int):
    """Blocks ``0..n-1`` return their input unchanged (``start_at_layer`` replaces their output anyway).

    The bridge's ``start_at_layer`` injects the residual at block n but still
    runs the blocks below it on placeholder input; skipping them is what makes
    the spliced forward cheaper. ``object.__setattr__`` because the bridge's
    ``__setattr__`` forwards attributes to the wrapped HF layer.
    """
    blocks = [lm.model.blocks[i] for i in range(n)]
    try:
        for b in blocks:
            object.__setattr__(b, "forward", lambda hidden_states, *args, **kwargs: hidden_states)
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def _logits_after(lm, resid_BTD: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits of the model continued from ``resid_BTD`` at ``blocks.{layer}.hook_resid_post`` (blocks L+1..)."""
    device = lm.model.cfg.device
    with _skipping_blocks(lm, layer + 1):
        return lm.model(resid_BTD.to(device), start_at_layer=layer + 1, return_type="logits")


def _zero_hook(skip_BT: torch.Tensor):
    def hook(act_BTD, hook=None):
        return act_BTD * skip_BT[:, :, None].to(act_BTD.device, act_BTD.dtype)
    return hook


def _material(lm, lm_cfg: LMConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    from fcsae import corpus

    return {"model": store.model_fingerprint(lm), "layer": lm_cfg.layer, "dtype": lm_cfg.dtype,
            "corpus": corpus.fingerprint(eval_cfg.corpus), "core_tokens": eval_cfg.core_tokens,
            "context_len": eval_cfg.context_len, "kl_topk": eval_cfg.kl_topk, "resid": True}


def load_lm(lm_cfg: LMConfig, lm=None):
    """``lm`` if given, else the model named by ``lm_cfg``; either way checked to have ``lm_cfg.layer``."""
    from fcsae.lm import check_layer, load_model

    if lm is None:
        lm = load_model(lm_cfg.model, device=lm_cfg.device, dtype=lm_cfg.dtype)
    check_layer(lm, lm_cfg.layer)
    return lm


@torch.no_grad()
def _compute_baseline(lm, lm_cfg: LMConfig, eval_cfg: EvalConfig, progress: bool) -> dict[str, torch.Tensor]:
    tokens_NT = eval_tokens(lm, eval_cfg)
    skip_NT = _skip_mask(lm, tokens_NT)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("ce_clean", "ce_zero", "kl_zero", "kl_zero_exact",
                                                           "topk_idx", "topk_logp", "resid")}
    bs = eval_cfg.batch_size
    for i in tqdm(range(0, tokens_NT.shape[0], bs), desc="core eval baseline", disable=not progress):
        tok, skip = tokens_NT[i:i + bs], skip_NT[i:i + bs]
        logp_clean = _next_token_logp(_logits(lm, tok, _capture_hook(parts["resid"]), lm_cfg.layer))
        logp_zero = _next_token_logp(_logits(lm, tok, _zero_hook(skip), lm_cfg.layer))
        V = logp_clean.shape[-1]
        flat_p, flat_q = logp_clean.reshape(-1, V), logp_zero.reshape(-1, V)
        shape = logp_clean.shape[:2]
        parts["ce_clean"].append(_ce(logp_clean, tok).cpu())
        parts["ce_zero"].append(_ce(logp_zero, tok).cpu())
        exact = kl_exact(flat_p, flat_q).reshape(shape).cpu()
        parts["kl_zero_exact"].append(exact)
        if eval_cfg.kl_topk:
            vals, idx = flat_p.topk(min(eval_cfg.kl_topk, V), dim=1)
            parts["topk_idx"].append(idx.int().reshape(*shape, -1).cpu())
            parts["topk_logp"].append(vals.reshape(*shape, -1).cpu())
            parts["kl_zero"].append(kl_topk(idx, vals, flat_q).reshape(shape).cpu())
        else:
            parts["kl_zero"].append(exact)
    out = {k: torch.cat(v) for k, v in parts.items() if v}
    out["tokens"] = tokens_NT.long()
    out["skip"] = skip_NT.to(torch.uint8)
    return out


def prepare_core_cache(lm_cfg: LMConfig, eval_cfg: EvalConfig, lm=None, progress: bool = True) -> CoreBaseline:
    """The cached clean/zero-ablated baseline for (model, layer, eval tokens); computed and stored on a miss.

    A missing or corrupt entry is recomputed (see ``fcsae.evals.store``). The
    sweep driver calls this once before its trials.
    """
    lm = load_lm(lm_cfg, lm)
    material = _material(lm, lm_cfg, eval_cfg)
    entry = store.load_entry(KIND, material)
    if entry is None:
        log.info("core eval: computing the clean and zero-ablated baseline (cached afterwards)")
        tensors = _compute_baseline(lm, lm_cfg, eval_cfg, progress)
        info = {"ce_clean": float(_masked_mean(tensors["ce_clean"], tensors["skip"].bool())),
                "n_contexts": int(tensors["tokens"].shape[0])}
        store.save_entry(KIND, material, tensors, info)
        entry = store.load_entry(KIND, material)
        if entry is None:
            raise FcsaeInputError(f"core eval cache under {store.entry_dir(KIND, material)} cannot be written back")
    t = entry.tensors
    return CoreBaseline(t["tokens"], t["skip"].bool(), t["ce_clean"], t["ce_zero"], t["kl_zero"],
                        t["kl_zero_exact"], t.get("topk_idx"), t.get("topk_logp"), t["resid"])


def _masked_mean(v_NS: torch.Tensor, skip_NT: torch.Tensor) -> torch.Tensor:
    keep = ~skip_NT[:, :-1]
    return v_NS[keep].double().mean()


def _sae_dims(sae) -> tuple[int, int]:
    W_dec = sae.W_dec
    return int(W_dec.shape[1]), int(W_dec.shape[0])


def check_sae_matches(sae, lm, layer: int) -> None:
    """Raise ``FcsaeInputError`` when the SAE's input width differs from the model's residual width."""
    d_in, _ = _sae_dims(sae)
    if d_in != lm.d_model:
        raise FcsaeInputError(f"SAE d_in={d_in} does not match {lm.name}'s d_model={lm.d_model} at "
                              f"blocks.{layer}.hook_resid_post; evaluate it with the model it was trained on")


def _splice(sae, norm_scale: float, skip_BT: torch.Tensor, acc: ReconAccumulator, act_BTD: torch.Tensor) -> torch.Tensor:
    """``act_BTD`` with every non-BOS position replaced by the SAE's reconstruction (metrics go to ``acc``)."""
    keep_N = ~skip_BT.reshape(-1).to(act_BTD.device)
    x_raw_ND = act_BTD.reshape(-1, act_BTD.shape[-1])[keep_N]
    x_ND = x_raw_ND.to(sae.W_dec.device, torch.float32) * norm_scale
    latents_NF = sae.encode(x_ND)
    recon_ND = sae.decode(latents_NF)
    acc.update(x_ND, recon_ND, latents_NF)
    out = act_BTD.reshape(-1, act_BTD.shape[-1]).clone()
    out[keep_N] = (recon_ND / norm_scale).to(act_BTD.device, act_BTD.dtype)
    return out.reshape(act_BTD.shape)


def _spliced_logits(lm, layer: int, sae, norm_scale: float, tok_BT: torch.Tensor, skip_BT: torch.Tensor,
                    resid_BTD: torch.Tensor | None, acc: ReconAccumulator) -> torch.Tensor:
    """Logits with the SAE spliced in at ``layer``: from the cached activations (blocks L+1.. only) when
    ``resid_BTD`` is given and L is not the last block, else the full forward with a hook."""
    if resid_BTD is not None and layer + 1 < lm.n_layers:
        return _logits_after(lm, _splice(sae, norm_scale, skip_BT, acc, resid_BTD), layer)
    return _logits(lm, tok_BT, lambda act, hook=None: _splice(sae, norm_scale, skip_BT, acc, act), layer)


@torch.no_grad()
def evaluate_core(sae, lm_cfg: LMConfig, eval_cfg: EvalConfig, norm_scale: float, lm=None,
                  progress: bool = True, from_cache: bool = True) -> dict[str, float]:
    """Core metrics of ``sae`` at ``blocks.{lm_cfg.layer}.hook_resid_post`` (see the module docstring).

    ``norm_scale`` is the activation cache's (SAE input = raw x ``norm_scale``).
    Per call only the SAE-spliced forward passes run, from block L+1 on the
    cached activations (``from_cache=False``: the full forward with a splice
    hook, the reference the tests compare with); the baseline comes from the
    cache (``prepare_core_cache``).
    """
    if not (isinstance(norm_scale, (int, float)) and math.isfinite(norm_scale) and norm_scale > 0):
        raise FcsaeInputError(f"norm_scale: must be a finite number > 0, got {norm_scale!r}")
    lm = load_lm(lm_cfg, lm)
    check_sae_matches(sae, lm, lm_cfg.layer)
    base = prepare_core_cache(lm_cfg, eval_cfg, lm=lm, progress=progress)
    acc = ReconAccumulator(*_sae_dims(sae))
    ce_sae, kl_sae = [], []
    bs = eval_cfg.batch_size
    for i in tqdm(range(0, base.tokens_NT.shape[0], bs), desc="core eval", disable=not progress):
        tok, skip = base.tokens_NT[i:i + bs], base.skip_NT[i:i + bs]
        resid = base.resid_NTD[i:i + bs] if from_cache else None
        logp_sae = _next_token_logp(_spliced_logits(lm, lm_cfg.layer, sae, norm_scale, tok, skip, resid, acc))
        V = logp_sae.shape[-1]
        ce_sae.append(_ce(logp_sae, tok).cpu())
        flat_q = logp_sae.reshape(-1, V)
        if base.topk_idx_NSK is not None:
            idx = base.topk_idx_NSK[i:i + bs].reshape(flat_q.shape[0], -1).to(flat_q.device)
            lp = base.topk_logp_NSK[i:i + bs].reshape(flat_q.shape[0], -1).to(flat_q.device)
            kl = kl_topk(idx, lp, flat_q)
        else:  # exact KL: the clean distribution is recomputed here (from block L+1 too when possible)
            clean = _logits_after(lm, resid, lm_cfg.layer) if resid is not None and lm_cfg.layer + 1 < lm.n_layers \
                else _logits(lm, tok)
            kl = kl_exact(_next_token_logp(clean).reshape(-1, V), flat_q)
        kl_sae.append(kl.reshape(logp_sae.shape[:2]).cpu())
    skip = base.skip_NT
    means = {
        "ce_loss_clean": _masked_mean(base.ce_clean_NS, skip),
        "ce_loss_sae": _masked_mean(torch.cat(ce_sae), skip),
        "ce_loss_zero_ablation": _masked_mean(base.ce_zero_NS, skip),
        "kl_div_sae": _masked_mean(torch.cat(kl_sae), skip),
        "kl_div_zero_ablation": _masked_mean(base.kl_zero_NS, skip),
        "kl_div_zero_ablation_exact": _masked_mean(base.kl_zero_exact_NS, skip),
    }
    means = {k: float(v) for k, v in means.items()}
    metrics = acc.result()
    metrics.update(means)
    metrics.update(downstream_scores(means["ce_loss_clean"], means["ce_loss_sae"], means["ce_loss_zero_ablation"],
                                     means["kl_div_sae"], means["kl_div_zero_ablation"]))
    return metrics
