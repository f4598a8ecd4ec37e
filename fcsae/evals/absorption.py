"""First-letter feature-absorption eval, after SAEBench 0.6.0's absorption eval (docs/evals.md).

Per (model, layer, eval config), cached once (``prepare_absorption_cache``):
words, activations at the word position, and the ground-truth probe
(``fcsae.evals.probe``; SAEBench's raw-activation probe by default). Per SAE
(``evaluate_absorption``):

1. Encode the cached activations (x ``norm_scale``, the SAE's input space)
   and divide the codes by ``norm_scale``: codes in raw-activation units,
   as a SAELens export (``fcsae.saelens``) gives them.
2. Letters are kept where the probe's test F1 > ``probe_f1_min``; with fewer
   than 20, SAEBench refuses (``strict``) or the summary carries a warning.
3. k-sparse probing: an L1-regularised 26-output probe on all latents ranks
   them per letter; for k = 1..``max_k`` a logistic probe on that letter's
   top-k latents is fitted and scored (test F1). The main latents are the
   top-k at the last k whose F1 beat the previous best by more than
   ``f1_jump``; their count is the number of split features.
4. For every test word of a kept letter that the probe classifies correctly
   (probe true positives), with p the unit probe direction, a latent's
   projection is ``code_i * cos(W_dec_i, p)`` and the word's ``x . p``:
   - absorption fraction: 0 if the main latents' projection reaches the
     word's, or if the (up to 3) largest positive projections of non-main
     latents with cos >= 0.1 to p make up less than 40% of it; 1 if the main
     latents' projection is <= 0; otherwise absorbed / (absorbed + main),
     absorbed = min(those latents' projection, word - main).
   - full absorption: no main latent fires, the top-projecting latent has
     cos >= 0.025 to p, the word's projection is >= 0 and that latent carries
     at least 40% of it.
   Per letter: mean absorption fraction and full-absorption rate over the
   probe true positives; the summary averages them over scored letters and
   adds the interval and meaningfulness columns (``absorption_stats``).

Remaining differences from SAEBench (docs/evals.md): shared KV-cached
prompt prefixes, the absorption words reuse the test activations, and the
L1 ranking probe starts at zero.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from fcsae.config import EvalConfig, LMConfig
from fcsae.errors import FcsaeInputError
from fcsae.evals import absorption_stats as stats
from fcsae.evals import probe as probe_mod
from fcsae.evals import store
from fcsae.evals.probe import LETTERS, ProbeData

log = logging.getLogger(__name__)

KIND = "absorption"
PROMPT_VERSION = 2
"""Bump when the vocabulary, split or prompt construction changes (invalidates cached activations)."""
FULL_ABSORPTION_COS = 0.025
ABSORBER_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
ACTIVE_EPS = 1e-8
L1_DECAY = 0.01
L1_EPOCHS = 50
class AbsorptionRefused(FcsaeInputError):
    """The model/layer's probe passes fewer than ``absorption_stats.MIN_LETTERS`` letters: SAEBench's refusal."""


class AbsorptionResult(NamedTuple):
    """Summary numbers and the per-letter table of one SAE's absorption eval."""

    summary: dict[str, float]
    per_letter: pl.DataFrame


class WordAbsorption(NamedTuple):
    """Per-word absorption results for one letter."""

    fraction_N: torch.Tensor
    full_N: torch.Tensor
    latent_share_N: torch.Tensor
    """Share of the word's probe projection that all the SAE's latents together carry."""


# ------------------------------------------------------------------ pure parts


def absorption_scores(latents_NF: torch.Tensor, x_ND: torch.Tensor, probe_D: torch.Tensor, W_dec_FD: torch.Tensor,
                      main_ids: list[int]) -> WordAbsorption:
    """Absorption fraction and full absorption for words ``x_ND`` with SAE latents ``latents_NF`` (see module doc)."""
    p_D = probe_D.float() / probe_D.float().norm()
    cos_F = (W_dec_FD.float() @ p_D) / W_dec_FD.float().norm(dim=1).clamp_min(1e-12)
    proj_NF = latents_NF.float() * cos_F
    word_N = x_ND.float() @ p_D
    main = torch.zeros(W_dec_FD.shape[0], dtype=torch.bool)
    main[main_ids] = True
    main_N = proj_NF[:, main].sum(1)

    cand_NF = (~main & (cos_F >= ABSORBER_COS))[None, :] & (proj_NF > 0)
    k = min(MAX_ABSORBERS, proj_NF.shape[1])
    absorbers_N = proj_NF.masked_fill(~cand_NF, 0.0).topk(k, dim=1).values.sum(1)
    safe_word_N = torch.where(word_N == 0, torch.full_like(word_N, float("nan")), word_N)
    share_N = absorbers_N / safe_word_N
    absorbed_N = torch.minimum(absorbers_N, word_N - main_N)
    partial_N = (absorbed_N / (absorbed_N + main_N)).clamp(0, 1)
    no_absorb = (main_N >= word_N) | ~(share_N >= PROJECTION_SHARE)
    fraction_N = torch.where(no_absorb, 0.0, torch.where(main_N <= 0, 1.0, partial_N))

    top_val_N, top_idx_N = proj_NF.max(dim=1)
    main_silent_N = (latents_NF[:, main] < ACTIVE_EPS).all(1)
    full_N = (main_silent_N & (cos_F[top_idx_N] >= FULL_ABSORPTION_COS) & (word_N >= 0)
              & (top_val_N >= PROJECTION_SHARE * word_N))
    return WordAbsorption(fraction_N, full_N, proj_NF.sum(1) / safe_word_N)


def split_features(f1_by_k: list[float], feats_by_k: list[list[int]], f1_jump: float) -> list[int]:
    """Main latents: the top-k set at the last k whose F1 beat the best so far by more than ``f1_jump``."""
    best, chosen = -math.inf, []
    for f1, feats in zip(f1_by_k, feats_by_k):
        if f1 > best + f1_jump:
            best, chosen = f1, list(feats)
        else:
            break
    return chosen


def l1_probe_weights(lat_NF: torch.Tensor, labels_N: torch.Tensor, n_classes: int, seed: int,
                     epochs: int = L1_EPOCHS, batch: int = 4096) -> torch.Tensor:
    """One-vs-rest logistic probes with an L1 penalty on all latents, as SAEBench ranks them; weights ``[C, F]``.

    ``lat_NF`` is a sparse COO tensor of SAE codes. BCE with positive weights
    (neg/pos), L1 0.01 x mean over probes of sum |w|, Adam lr 1e-2 decaying
    exponentially to 1e-5, weight decay 1e-6 and a seeded batch order
    (SAEBench's ``train_sparse_multi_probe``). One deliberate difference: zero
    init instead of ``nn.Linear``'s U(+-1/sqrt(F)). For real widths that init
    is <= 0.008 and the first Adam step (0.01) erases it; on small problems it
    would dominate the ranking, and dead latents keep weight 0 instead of noise.
    """
    gen = torch.Generator().manual_seed(seed)
    N, n_lat = lat_NF.shape
    y_NC = F.one_hot(labels_N.long(), n_classes).float()
    pos_C = y_NC.sum(0)
    pos_weight_C = torch.where(pos_C > 0, (N - pos_C) / pos_C.clamp_min(1), torch.ones_like(pos_C))
    W = torch.zeros(n_classes, n_lat, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-2, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(1e-5 / 1e-2) / epochs))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight_C)
    # SAE codes are mostly zeros: sparse rows make each step's product and its gradient cheap.
    sparse = lat_NF.coalesce()
    with torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(N, generator=gen).split(batch):
                opt.zero_grad()
                logits = torch.sparse.mm(sparse.index_select(0, rows), W.T) + b
                loss = loss_fn(logits, y_NC[rows]) + L1_DECAY * W.abs().sum(1).mean()
                loss.backward()
                opt.step()
            sched.step()
    return W.detach()


def f1_binary(truth: np.ndarray, pred: np.ndarray) -> float:
    """F1 of boolean predictions (0 when there are no true or no predicted positives)."""
    tp = float(np.sum(truth & pred))
    denom = float(np.sum(truth) + np.sum(pred))
    return 2 * tp / denom if denom else 0.0


def _fit_f1(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500, class_weight="balanced", random_state=seed).fit(x_tr, y_tr)
    return f1_binary(y_te.astype(bool), clf.decision_function(x_te) > 0)


# ------------------------------------------------------------------ cache


def _material(lm, lm_cfg: LMConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    """What the words and prompt activations depend on (the probe convention keys its own entry)."""
    return {"model": store.model_fingerprint(lm), "layer": lm_cfg.layer, "dtype": lm_cfg.dtype,
            "words": eval_cfg.absorption_words, "icl_examples": eval_cfg.icl_examples,
            "icl_prefixes": eval_cfg.icl_prefixes, "seed": eval_cfg.seed,
            "train_fraction": eval_cfg.absorption_train_fraction, "prompt_version": PROMPT_VERSION}


def _compute_acts(lm, lm_cfg: LMConfig, eval_cfg: EvalConfig, progress: bool):
    t0 = time.perf_counter()
    vocab = probe_mod.sample_vocab(lm.tokenizer, eval_cfg)
    x_tr, order_tr = probe_mod.collect_acts(lm, lm_cfg, eval_cfg, vocab, train=True, progress=progress)
    x_te, order_te = probe_mod.collect_acts(lm, lm_cfg, eval_cfg, vocab, train=False, progress=progress)
    log.info("absorption cache: %d words, prompt activations %.1f s", len(vocab.words), time.perf_counter() - t0)
    tensors = {"acts_train": x_tr, "acts_test": x_te,
               "labels_train": torch.tensor([vocab.labels[i] for i in order_tr]),
               "labels_test": torch.tensor([vocab.labels[i] for i in order_te])}
    info = {"words_test": [vocab.words[i] for i in order_te], "words_train": [vocab.words[i] for i in order_tr]}
    return tensors, info


def _compute_probe(acts: store.Entry, eval_cfg: EvalConfig):
    t0 = time.perf_counter()
    t = acts.tensors
    W, b, metrics = probe_mod.train_probe(t["acts_train"].double().numpy(), t["labels_train"].numpy(),
                                          t["acts_test"].double().numpy(), t["labels_test"].numpy(),
                                          seed=eval_cfg.seed, convention=eval_cfg.absorption_probe)
    log.info("absorption cache: %s probe %.1f s", eval_cfg.absorption_probe, time.perf_counter() - t0)
    return {"probe_W": torch.from_numpy(W).float(), "probe_b": torch.from_numpy(b).float()}, {"probe_metrics": metrics}


def _cached(kind: str, material: dict[str, Any], compute) -> store.Entry:
    """The verified entry, computed and written (tensors, then the checked meta.json) on a miss."""
    entry = store.load_entry(kind, material)
    if entry is None:
        tensors, info = compute()
        store.save_entry(kind, material, tensors, info)
        entry = store.load_entry(kind, material)
        if entry is None:
            raise FcsaeInputError(f"absorption cache under {store.entry_dir(kind, material)} cannot be written back")
    return entry


def prepare_absorption_cache(lm_cfg: LMConfig, eval_cfg: EvalConfig, lm=None, progress: bool = True) -> ProbeData:
    """The cached words, activations and probe for (model, layer, eval config); computed and stored on a miss.

    Two entries: the words + prompt activations (keyed by model, layer, word
    budget, prompts, seed) and the probe (keyed by those plus the probe
    convention), so switching ``absorption_probe`` reuses the activations. A
    missing or corrupt entry is recomputed. Raises ``FcsaeInputError`` when
    the tokenizer has fewer single-token words than ``absorption_words``.
    """
    from fcsae.evals.core import load_lm

    lm = load_lm(lm_cfg, lm)
    material = _material(lm, lm_cfg, eval_cfg)
    acts = _cached(KIND, material, lambda: _compute_acts(lm, lm_cfg, eval_cfg, progress))
    probe = _cached(KIND + "-probe", {**material, "probe": eval_cfg.absorption_probe},
                    lambda: _compute_probe(acts, eval_cfg))
    t = acts.tensors
    return ProbeData(t["acts_train"], t["acts_test"], t["labels_train"], t["labels_test"], acts.meta["words_test"],
                     probe.tensors["probe_W"], probe.tensors["probe_b"], probe.meta["probe_metrics"],
                     tuple(acts.meta["words_train"]))


# ------------------------------------------------------------------ per SAE


@torch.no_grad()
def encode_sparse(sae, x_ND: torch.Tensor, norm_scale: float, batch: int = 1024) -> torch.Tensor:
    """SAE codes of raw activations as a sparse COO tensor [N, F], in raw-activation units (codes / norm_scale).

    The SAE sees ``x * norm_scale``; dividing its codes by ``norm_scale``
    gives the codes whose unit-norm decoder rows rebuild the raw activation,
    which is what a SAELens export holds (``fcsae.saelens``) and what
    SAEBench's latent projection ``code * cos(W_dec_i, probe)`` assumes.
    """
    device = sae.W_dec.device
    parts = []
    for i in range(0, len(x_ND), batch):
        z = sae.encode(x_ND[i:i + batch].to(device, torch.float32) * norm_scale).float().cpu() / norm_scale
        parts.append(z.to_sparse())
    return torch.cat(parts).coalesce()


def _columns(lat_NF: torch.Tensor, cols: torch.Tensor) -> np.ndarray:
    return lat_NF.index_select(1, cols).to_dense().numpy()


def _letter_row(letter: int, data: ProbeData, lat_tr: torch.Tensor, lat_te: torch.Tensor, ranking_CF: torch.Tensor,
                W_dec: torch.Tensor, eval_cfg: EvalConfig) -> tuple[dict, np.ndarray]:
    """The letter's table row and the absorption fraction of each of its probe true positives."""
    y_tr = (data.labels_train_N == letter).numpy()
    y_te = (data.labels_test_N == letter).numpy()
    f1s, feats = [], []
    for k in range(1, min(eval_cfg.max_k, ranking_CF.shape[1]) + 1):
        top = ranking_CF[letter].topk(k).indices
        f1s.append(_fit_f1(_columns(lat_tr, top), y_tr, _columns(lat_te, top), y_te, eval_cfg.seed))
        feats.append(top.tolist())
        if len(f1s) > 1 and not f1s[-1] > max(f1s[:-1]) + eval_cfg.f1_jump:
            break  # the split-feature walk has stopped; larger k cannot change the result
    main = split_features(f1s, feats, eval_cfg.f1_jump)
    scores = data.acts_test_ND @ data.probe_W_LD[letter] + data.probe_b_L[letter]
    tp_idx = ((data.labels_test_N == letter) & (scores > 0)).nonzero().squeeze(1)
    res = absorption_scores(lat_te.index_select(0, tp_idx).to_dense(), data.acts_test_ND[tp_idx],
                            data.probe_W_LD[letter], W_dec, main)
    n_tp = int(tp_idx.numel())
    row = {
        "letter": LETTERS[letter], "probe_f1": data.probe_metrics[letter]["f1"],
        "sparse_f1_k1": f1s[0] if f1s else float("nan"), "sparse_f1_main": f1s[len(main) - 1] if main else float("nan"),
        "num_split_features": len(main), "main_latents": main, "num_probe_true_positives": n_tp,
        "mean_absorption_fraction": float(res.fraction_N.sum()) / n_tp if n_tp else float("nan"),
        "full_absorption_rate": float(res.full_N.sum()) / n_tp if n_tp else float("nan"),
        "num_full_absorption": int(res.full_N.sum()),
        "latent_share": float(res.latent_share_N.nanmean()) if n_tp else float("nan"),
    }
    return row, res.fraction_N.double().numpy()


def evaluate_absorption(sae, lm_cfg: LMConfig, eval_cfg: EvalConfig, norm_scale: float, lm=None,
                        progress: bool = True, strict: bool = False) -> AbsorptionResult:
    """First-letter absorption of ``sae`` (see the module docstring); per call only encodes and probes run.

    ``lm`` is the loaded model (loaded from ``lm_cfg`` when None). When fewer
    than ``stats.MIN_LETTERS`` letters pass the probe, ``strict`` (``fcsae eval``)
    raises ``AbsorptionRefused`` as SAEBench refuses; otherwise (sweeps) the
    SAE is scored and the summary's ``warning`` says so. An SAE none of whose
    latents fires on the probe words gets NaN scores (and a warning), not an
    error, so a collapsed trial in a sweep is still recorded.
    """
    from fcsae.evals.core import check_sae_matches, load_lm

    if not (isinstance(norm_scale, (int, float)) and math.isfinite(norm_scale) and norm_scale > 0):
        raise FcsaeInputError(f"norm_scale: must be a finite number > 0, got {norm_scale!r}")

    lm = load_lm(lm_cfg, lm)
    check_sae_matches(sae, lm, lm_cfg.layer)
    data = prepare_absorption_cache(lm_cfg, eval_cfg, lm=lm, progress=progress)
    kept, refusal = check_letters(data, lm_cfg, eval_cfg, strict)
    # Per-SAE work is many small ops: one torch thread (the L1 ranking probe took 3-5 s with 1 thread and 43 s
    # with 2 on the shared 2-core machine at load ~6), one BLAS thread for the sklearn fits.
    with probe_mod.one_thread(), threadpool_limits(limits=1, user_api="blas"):
        res = _score_sae(sae, data, norm_scale, eval_cfg, kept)
    res.summary["warning"] = "; ".join(w for w in (refusal, res.summary.get("warning")) if w) or None
    return res


def check_letters(data: ProbeData, lm_cfg: LMConfig, eval_cfg: EvalConfig, strict: bool) -> tuple[list[int], str | None]:
    """Letters whose probe passes, and SAEBench's refusal line when too few do (raised when ``strict``, else logged)."""
    kept = [i for i, m in enumerate(data.probe_metrics) if m["f1"] > eval_cfg.probe_f1_min]
    if len(kept) >= stats.MIN_LETTERS:
        return kept, None
    refusal = (f"absorption: only {len(kept)} letters pass probe F1 > {eval_cfg.probe_f1_min:g} on {lm_cfg.model} "
               f"layer {lm_cfg.layer} ({eval_cfg.absorption_probe} probe, "
               f"{len(data.labels_train_N) + len(data.labels_test_N)} words); SAEBench needs {stats.MIN_LETTERS} "
               f"and refuses to score it: use another layer or more words (eval.absorption_words, 0 = all)")
    if strict:
        raise AbsorptionRefused(refusal)
    log.warning("%s", refusal)
    return kept, refusal


def _score_sae(sae, data: ProbeData, norm_scale: float, eval_cfg: EvalConfig, kept: list[int]) -> AbsorptionResult:
    lat_tr, lat_te = encode_sparse(sae, data.acts_train_ND, norm_scale), encode_sparse(sae, data.acts_test_ND, norm_scale)
    rows, fractions, warning = [], [], None
    if lat_tr._nnz() == 0:
        warning = "no SAE latent fires on any probe word (is norm_scale right?): scores are NaN"
        log.warning("absorption eval: %s", warning)
    else:
        ranking = l1_probe_weights(lat_tr, data.labels_train_N, len(LETTERS), eval_cfg.seed)
        W_dec = sae.W_dec.detach().float().cpu()
        for i in kept:
            row, frac = _letter_row(i, data, lat_tr, lat_te, ranking, W_dec, eval_cfg)
            rows.append(row)
            fractions.append(frac)
    table = pl.DataFrame(rows, schema=PER_LETTER_TYPES)
    summary = stats.summarise(table, fractions, data, eval_cfg, n_kept=len(kept))
    summary["warning"] = warning
    return AbsorptionResult(summary, table)


PER_LETTER_TYPES = {
    "letter": pl.Utf8, "probe_f1": pl.Float64, "sparse_f1_k1": pl.Float64, "sparse_f1_main": pl.Float64,
    "num_split_features": pl.Int64, "main_latents": pl.List(pl.Int64), "num_probe_true_positives": pl.Int64,
    "mean_absorption_fraction": pl.Float64, "full_absorption_rate": pl.Float64, "num_full_absorption": pl.Int64,
    "latent_share": pl.Float64}
"""Columns of the per-letter table ``evaluate_absorption`` returns."""
