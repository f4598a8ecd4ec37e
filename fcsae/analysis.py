"""Frequency-consistency patterns: per-latent tables and figures from a saved SAE's tracker, or from the planted toy.

What it shows, for each latent i (docs/design.md, "The method"): the firing
frequency f_i against the consistency c_i, coloured by what the absorption
eval says the latent is (an *absorber*, a letter's *main* latent, or *other*);
the distribution of the score s_i = f_i (1 - c_i); and how score quantiles and
the top latents' scores move during training, from snapshots logged by
``TrackerSnapshots``.

Recipes (also in docs/report.md)::

    # a trained SAE (its tracker state is saved with it by fcsae train / sweeps)
    python -m fcsae.analysis sae RUN_DIR/sae --out figs [--letters PER_LETTER.parquet] [--snapshots FILE]
    # the planted toy, where absorbers are known
    python -m fcsae.analysis toy --out figs [--criterion fc] [--steps 800]

    # logging snapshots while training with the Trainer directly:
    trainer = Trainer(sae, trainer_cfg, split_cfg, tracker_cfg)
    trainer.fit(batches, callbacks=[TrackerSnapshots("snapshots.jsonl", trainer, every=50)])
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import polars as pl
import torch
from matplotlib.figure import Figure

from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig, from_dict
from fcsae.errors import FcsaeInputError
from fcsae.io import atomic_path
from fcsae.plotting import new_figure, save_png

log = logging.getLogger(__name__)

ROLES = ("absorber", "main", "other")
"""Latent roles, in plotting priority: a latent both main for one letter and absorber for another is an absorber."""
ROLE_STYLE = {"absorber": ("#d62728", 30, 0.9), "main": ("#1f77b4", 30, 0.9), "other": ("#9a9a9a", 8, 0.35)}
QUANTILES = (0.5, 0.9, 0.99, 1.0)
"""Score quantiles recorded per snapshot (1.0 = the maximum)."""


class TrackedSAE(NamedTuple):
    """A saved SAE with its tracker rebuilt from the saved state."""

    sae: object
    tracker: object
    tracker_cfg: TrackerConfig


def load_tracked_sae(sae_dir: str | Path) -> TrackedSAE:
    """Load ``sae_dir`` (safetensors + cfg.json) and its ``tracker.*`` state; the tracker config from ``../train.json``."""
    from fcsae.sae import SparseAutoencoder
    from fcsae.tracker import FrequencyConsistencyTracker

    sae_dir = Path(sae_dir)
    sae, extras = SparseAutoencoder.load_with_extras(sae_dir)
    state = {k[len("tracker."):]: v for k, v in extras.items() if k.startswith("tracker.")}
    if not state:
        raise FcsaeInputError(f"{sae_dir}: no tracker state saved with this SAE; train with tracker.enabled=true "
                              "or a split criterion fc/frequency/inconsistency")
    train_json = sae_dir.parent / "train.json"
    cfg = TrackerConfig()
    if train_json.is_file():
        try:
            cfg = from_dict(TrackerConfig, json.loads(train_json.read_text()).get("tracker") or {}, "tracker.")
        except ValueError as e:
            raise FcsaeInputError(f"{train_json}: unreadable tracker config ({e})") from None
    else:
        log.warning("%s missing: scoring the tracker state with the default TrackerConfig", train_json)
    tracker = FrequencyConsistencyTracker(cfg, sae.cfg.dict_size, sae.cfg.d_in)
    tracker.load_state_dict(state)
    return TrackedSAE(sae, tracker, cfg)


def latent_roles(dict_size: int, main: Iterable[int] = (), absorbers: Iterable[int] = ()) -> list[str]:
    """Role per latent: ``absorber``, ``main`` or ``other`` (absorber wins when a latent is both)."""
    main, absorbers = [int(i) for i in main], [int(i) for i in absorbers]
    bad = [i for i in main + absorbers if not 0 <= i < dict_size]
    if bad:
        raise FcsaeInputError(f"latent ids {sorted(set(bad))[:5]} are outside [0, {dict_size}): "
                              "the absorption table belongs to another SAE")
    roles = ["other"] * dict_size
    for i in main:
        roles[int(i)] = "main"
    for i in absorbers:
        roles[int(i)] = "absorber"
    return roles


def main_latents(per_letter: pl.DataFrame) -> set[int]:
    """The main latents of every letter of an absorption per-letter table (``main_latents`` column)."""
    if per_letter is None or "main_latents" not in per_letter.columns:
        return set()
    return set(per_letter["main_latents"].explode().drop_nulls().cast(pl.Int64).to_list())


@torch.no_grad()
def absorber_counts(sae, data, per_letter: pl.DataFrame, norm_scale: float) -> dict[int, int]:
    """Latent -> words it absorbs, by the absorption eval's own rule, on the eval's cached probe data.

    For each letter of ``per_letter`` and each of its probe true positives
    with a nonzero absorption fraction, the (up to 3) non-main latents with the
    largest positive projections on the probe direction and cosine >= 0.1 are
    the absorbers (``fcsae.evals.absorption``). ``data`` is the ``ProbeData``
    from ``prepare_absorption_cache``.
    """
    from fcsae.evals.absorption import ABSORBER_COS, MAX_ABSORBERS, absorption_scores
    from fcsae.evals.probe import LETTERS

    W_dec_FD = sae.W_dec.detach().float().cpu()
    counts: dict[int, int] = {}
    for row in per_letter.iter_rows(named=True):
        li = LETTERS.index(row["letter"])
        scores = data.acts_test_ND @ data.probe_W_LD[li] + data.probe_b_L[li]
        tp = (data.labels_test_N == li) & (scores > 0)
        if not bool(tp.any()):
            continue
        x_ND = data.acts_test_ND[tp] * norm_scale
        lat_NF = sae.encode(x_ND.to(sae.W_dec.device)).float().cpu()
        main = list(row["main_latents"] or [])
        res = absorption_scores(lat_NF, x_ND, data.probe_W_LD[li], W_dec_FD, main)
        p_D = data.probe_W_LD[li].float() / data.probe_W_LD[li].float().norm()
        dec_F = W_dec_FD @ p_D
        cand_F = (dec_F / W_dec_FD.norm(dim=1).clamp_min(1e-12)) >= ABSORBER_COS
        cand_F[main] = False
        proj_NF = (lat_NF * dec_F).masked_fill(~cand_F, 0.0).clamp_min(0.0)
        top = proj_NF[res.fraction_N > 0].topk(min(MAX_ABSORBERS, proj_NF.shape[1]), dim=1)
        for v, i in zip(top.values.flatten().tolist(), top.indices.flatten().tolist()):
            if v > 0:
                counts[i] = counts.get(i, 0) + 1
    return counts


def absorbers_from_eval(sae, lm_cfg, eval_cfg, norm_scale: float, per_letter: pl.DataFrame, lm=None) -> dict[int, int]:
    """``absorber_counts`` on the absorption eval's cached probe data for (model, layer, eval config).

    Use the ``EvalConfig`` the per-letter table was computed with (a sweep's
    ``eval.*`` columns): the cache entry is then a hit, and the main latents
    match the probe words.
    """
    from fcsae.evals.absorption import prepare_absorption_cache

    data = prepare_absorption_cache(lm_cfg, eval_cfg, lm=lm, progress=False)
    return absorber_counts(sae, data, per_letter, norm_scale)


def latent_table(scores, roles: list[str] | None = None) -> pl.DataFrame:
    """One row per latent: ``latent``, ``freq``, ``consistency``, ``score``, ``count``, ``role`` (from ``TrackerScores``)."""
    n = scores.freq_F.shape[0]
    return pl.DataFrame({
        "latent": np.arange(n), "freq": scores.freq_F.float().cpu().numpy(),
        "consistency": scores.consistency_F.float().cpu().numpy(), "score": scores.score_F.float().cpu().numpy(),
        "count": scores.count_F.float().cpu().numpy(), "role": roles or ["other"] * n,
    })


# ------------------------------------------------------------------ snapshots during training


class TrackerSnapshots:
    """Trainer callback: every ``every`` steps, score quantiles and the top latents' scores, to a JSON-lines file.

    Pass the trainer whose tracker to read: ``trainer.fit(batches, callbacks=[TrackerSnapshots(path, trainer)])``.
    Snapshots are taken at the trainer's metric steps (``log_every``), the first at or after each multiple of
    ``every``. The file is rewritten atomically at each snapshot; on a resumed run, the snapshots after
    the resume step are replaced.
    """

    def __init__(self, path: str | Path | None, trainer, every: int = 50, top: int = 8):
        """Log to ``path`` (None: keep in ``.rows`` only); ``trainer`` needs a tracker (tracker.enabled or a tracked criterion)."""
        if every < 1 or top < 1:
            raise FcsaeInputError(f"TrackerSnapshots: every and top must be >= 1, got {every}, {top}")
        if getattr(trainer, "tracker", None) is None:
            raise FcsaeInputError("TrackerSnapshots: the trainer has no tracker; set tracker.enabled=true")
        self.path, self.trainer, self.every, self.top = (Path(path) if path else None), trainer, every, top
        exists = self.path is not None and self.path.exists()
        self.rows = read_snapshots(self.path).filter(pl.col("step") <= trainer.step).to_dicts() if exists else []
        self._next = (trainer.step // every + 1) * every

    def on_metrics(self, step: int, metrics: dict) -> None:
        """Record a snapshot when ``step`` reached the next multiple of ``every``."""
        if step < self._next:
            return
        self._next = (step // self.every + 1) * self.every
        self.rows.append(snapshot(self.trainer.tracker, step, self.top))
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))


def snapshot(tracker, step: int, top: int = 8) -> dict:
    """Score quantiles (over latents with tracked inputs), frequency/consistency medians and the top latents."""
    sc = tracker.scores()
    alive = sc.count_F > 0
    s = sc.score_F[alive] if bool(alive.any()) else sc.score_F
    q = torch.quantile(s.float(), torch.tensor(QUANTILES)).tolist()
    vals, idx = sc.score_F.topk(min(top, sc.score_F.numel()))
    return {"step": int(step), "n_tracked": int(alive.sum()), **{f"score_q{int(p * 100)}": v for p, v in zip(QUANTILES, q)},
            "freq_median": float(sc.freq_F[alive].median()) if bool(alive.any()) else 0.0,
            "consistency_median": float(sc.consistency_F[alive].median()) if bool(alive.any()) else 1.0,
            "top_latents": idx.tolist(), "top_scores": vals.tolist()}


def read_snapshots(path: str | Path) -> pl.DataFrame:
    """The snapshots a ``TrackerSnapshots`` wrote (``FcsaeInputError`` naming the file if it is not valid JSON lines)."""
    path = Path(path)
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise FcsaeInputError(f"{path}: not a snapshots file (JSON lines from TrackerSnapshots): {e}") from None
    if not rows or any("step" not in r for r in rows):
        raise FcsaeInputError(f"{path}: no snapshots (each line needs a 'step')")
    return pl.DataFrame(rows).sort("step")


# ------------------------------------------------------------------ figures


def fc_scatter_figure(table: pl.DataFrame, title: str = "") -> Figure:
    """f_i (log x) against c_i, one point per latent with tracked inputs, coloured by role."""
    fig, (ax,) = new_figure(width=6.2, height=4.8)
    live = table.filter((pl.col("count") > 0) & (pl.col("freq") > 0))
    for role in reversed(ROLES):  # "other" first, so the few flagged latents are drawn on top
        sub = live.filter(pl.col("role") == role)
        if sub.height:
            colour, size, alpha = ROLE_STYLE[role]
            ax.scatter(sub["freq"].to_numpy(), sub["consistency"].to_numpy(), s=size, alpha=alpha, color=colour,
                       label=f"{role} ({sub.height})", edgecolors="none")
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency f_i (fraction of tokens, log scale)")
    ax.set_ylabel("consistency c_i (unitless, 1 = all inputs alike)")
    ax.set_title(title or f"Frequency vs consistency ({live.height} latents with tracked inputs)", fontsize=10)
    ax.legend(fontsize=8, title="latent role (count)", title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def score_distribution_figure(table: pl.DataFrame, z: float = SplitConfig().z) -> Figure:
    """Histogram of s_i = f_i (1 - c_i) per role (log counts), with the z-score split threshold marked."""
    fig, (ax,) = new_figure(width=6.2, height=4.4)
    live = table.filter(pl.col("count") > 0)
    s = live["score"].to_numpy()
    bins = np.linspace(0.0, float(s.max()) if len(s) and s.max() > 0 else 1.0, 40)
    for role in ROLES:
        v = live.filter(pl.col("role") == role)["score"].to_numpy()
        if len(v):
            ax.hist(v, bins=bins, color=ROLE_STYLE[role][0], alpha=0.6, label=f"{role} ({len(v)})")
    if len(s) > 1:
        thr = float(s.mean() + z * s.std(ddof=1))
        ax.axvline(thr, color="black", linestyle="--", linewidth=1, label=f"split threshold (mean + {z:g} std)")
    ax.set_yscale("log")
    ax.set_xlabel("absorption score s_i = f_i (1 - c_i) (fraction of tokens)")
    ax.set_ylabel("latents (count, log scale)")
    ax.set_title("Distribution of absorption scores", fontsize=10)
    ax.legend(fontsize=8, title="latent role (count)", title_fontsize=8)
    return fig


def score_evolution_figure(snaps: pl.DataFrame, batch_size: int | None = None, events: list[dict] | None = None) -> Figure:
    """Score quantiles and the top latent's score over training; split/resample events as ticks at the bottom."""
    fig, (ax,) = new_figure(width=6.5, height=4.4)
    scale = batch_size or 1
    x = snaps["step"].to_numpy() * scale
    for p, style in zip(QUANTILES, (":", "-.", "--", "-")):
        col = f"score_q{int(p * 100)}"
        if col in snaps.columns:
            ax.plot(x, snaps[col].to_numpy(), style, color="black", label="max" if p == 1.0 else f"{int(p * 100)}th percentile")
    if events:
        ev_x = [e["step"] * scale for e in events if e.get("kind") in ("split", "resample")]
        if ev_x:
            ax.plot(ev_x, np.zeros(len(ev_x)), "|", color="#d62728", markersize=12, label=f"split/resample events ({len(ev_x)})")
    ax.set_xlabel("training tokens (activation vectors)" if batch_size else "training step")
    ax.set_ylabel("absorption score s_i (fraction of tokens)")
    ax.set_title("Absorption scores during training (latents with tracked inputs)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def write_figures(table: pl.DataFrame, out: str | Path, snaps: pl.DataFrame | None = None, batch_size: int | None = None,
                  events: list[dict] | None = None, title: str = "") -> list[Path]:
    """Write the scatter, distribution and (with snapshots) evolution PNGs plus ``latents.csv`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_png(fc_scatter_figure(table, title), out / "fc_scatter.png"),
             save_png(score_distribution_figure(table), out / "score_distribution.png")]
    if snaps is not None and snaps.height:
        paths.append(save_png(score_evolution_figure(snaps, batch_size, events), out / "score_evolution.png"))
    with atomic_path(out / "latents.csv") as tmp:
        table.write_csv(tmp)
    return paths


def analyse_sae(sae_dir: str | Path, out: str | Path, per_letter: pl.DataFrame | None = None,
                absorbers: Iterable[int] = (), snapshots: str | Path | None = None) -> list[Path]:
    """Figures for a saved SAE: roles from an absorption per-letter table (main latents) and known absorbers."""
    sae_dir = Path(sae_dir)
    t = load_tracked_sae(sae_dir)
    roles = latent_roles(t.sae.cfg.dict_size, main_latents(per_letter), absorbers)
    table = latent_table(t.tracker.scores(), roles)
    snaps = read_snapshots(snapshots) if snapshots else None
    info = json.loads((sae_dir.parent / "train.json").read_text()) if (sae_dir.parent / "train.json").is_file() else {}
    events_file = sae_dir.parent / "events.jsonl"
    events = [json.loads(x) for x in events_file.read_text().splitlines() if x.strip()] if events_file.is_file() else None
    return write_figures(table, out, snaps, (info.get("trainer") or {}).get("batch_size"), events,
                         title=f"Frequency vs consistency: {sae_dir}")


# ------------------------------------------------------------------ the planted toy


class ToyAnalysis(NamedTuple):
    """A toy run: the latent table with ground-truth roles, the snapshots, the events and the true absorption."""

    table: pl.DataFrame
    snapshots: pl.DataFrame
    events: list
    absorption: dict
    detection: dict
    """``fcsae.detectors`` AUROC per detector for absorbers (``absorbers.<name>``) and absorbed parents (``parents.<name>``)."""


def absorbed_parents(res, dict_size: int, min_absorption: float = 0.1) -> torch.Tensor:
    """Bool per latent: the latent of a planted parent absorbed on at least ``min_absorption`` of its samples."""
    out = torch.zeros(dict_size, dtype=torch.bool)
    for p in res.per_parent:
        if p["latent"] >= 0 and p["absorption"] >= min_absorption:
            out[p["latent"]] = True
    return out


def auroc(score_L: torch.Tensor, positive_L: torch.Tensor, mask_L: torch.Tensor) -> float:
    """AUROC of ``score`` for positives vs the rest among ``mask``; nan when a class is empty."""
    from sklearn.metrics import roc_auc_score

    y, s = positive_L[mask_L].cpu().numpy(), score_L[mask_L].float().cpu().numpy()
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def detector_panel_auroc(panel: dict, res, mask_L: torch.Tensor) -> dict[str, float]:
    """AUROC of each detector score for the toy's absorbers and for its absorbed parents, among ``mask_L``."""
    parents = absorbed_parents(res, len(mask_L))
    out = {}
    for name, s in panel.items():
        out[f"absorbers.{name}"] = auroc(s.cpu(), res.absorber_L, mask_L.cpu())
        out[f"parents.{name}"] = auroc(s.cpu(), parents, mask_L.cpu())
    return out


def trainer_detection(trainer, res) -> tuple[dict, dict]:
    """The detector panel of a trained toy SAE (its tracker and input buffer) and its AUROCs (latents with data)."""
    from fcsae.detectors import detector_panel

    panel = detector_panel(trainer.sae, trainer.tracker, trainer.buffer_ND[:trainer.buffer_fill],
                           thresh=trainer.split_cfg.sibling_cos)
    return panel, detector_panel_auroc(panel, res, trainer.tracker.scores().count_F > 0)


def run_toy(criterion: str = "fc", steps: int = 800, seed: int = 0, dict_size: int = 64, k: int = 4,
            batch_size: int = 512, snapshot_every: int = 25, toy_cfg=None) -> ToyAnalysis:
    """Train a TopK SAE on the planted toy with the tracker on, and label latents by ground truth.

    Roles: ``absorber`` from ``fcsae.toy.measure_absorption``, ``main`` = each
    parent's own latent (the one a perfect SAE would keep), ``other`` the rest.
    The table also has one column per detector of ``fcsae.detectors``.
    """
    from fcsae.sae import SparseAutoencoder
    from fcsae.toy import ToyConfig, make_toy, measure_absorption, toy_batches
    from fcsae.trainer import Trainer

    toy = make_toy(toy_cfg or ToyConfig(), seed=seed)
    tcfg = TrainerConfig(lr=2e-3, batch_size=batch_size, total_tokens=steps * batch_size, warmup_steps=min(50, steps // 4),
                         resample_every=max(1, steps // 6), resample_until=0.7, buffer_tokens=8 * batch_size,
                         dead_tokens=50 * batch_size, seed=seed, log_every=snapshot_every)
    sae = SparseAutoencoder(SAEConfig(d_in=toy.x_ND.shape[1], dict_size=dict_size, activation="topk", k=k), seed=seed)
    trainer = Trainer(sae, tcfg, SplitConfig(criterion=criterion), TrackerConfig(enabled=True))
    snaps = TrackerSnapshots(None, trainer, every=snapshot_every)
    trainer.fit(toy_batches(toy.x_ND, batch_size, seed), callbacks=[snaps])
    sae.eval()
    res = measure_absorption(sae, toy)
    main = [p["latent"] for p in res.per_parent if p["latent"] >= 0]
    roles = latent_roles(dict_size, main, res.absorber_L.nonzero().flatten().tolist())
    panel, detection = trainer_detection(trainer, res)
    table = latent_table(trainer.tracker.scores(), roles).with_columns(
        [pl.Series(name, v.float().cpu().numpy()) for name, v in panel.items()])
    return ToyAnalysis(table, pl.DataFrame(snaps.rows), [ev.to_dict() for ev in trainer.events], res.summary,
                       detection)


def detection_summary(runs: list[ToyAnalysis]) -> pl.DataFrame:
    """Per detector: AUROC for absorbers and for absorbed parents, mean and std over the runs (seeds)."""
    rows = [{"seed": i, "key": k, "auroc": v} for i, r in enumerate(runs) for k, v in r.detection.items()]
    df = pl.DataFrame(rows).with_columns(pl.col("key").str.split_exact(".", 1).struct.rename_fields(["target", "detector"])
                                         .alias("k")).unnest("k")
    return (df.group_by("detector", "target", maintain_order=True)
            .agg(pl.col("auroc").drop_nans().mean().alias("mean"), pl.col("auroc").drop_nans().std().alias("std"),
                 pl.col("auroc").is_not_nan().sum().alias("n")))


def main(argv: list[str] | None = None) -> int:
    """``python -m fcsae.analysis {sae,toy}``: write the frequency-consistency figures (see the module docstring)."""
    import sys

    ap = argparse.ArgumentParser(prog="python -m fcsae.analysis", description="Frequency-consistency figures.")
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("sae", help="a saved SAE with tracker state")
    a.add_argument("path", help="the SAE directory (RUN/sae or <experiment>/trials/<id>/sae)")
    a.add_argument("--letters", default=None, help="per-letter absorption Parquet of this SAE (main latents)")
    a.add_argument("--snapshots", default=None, help="JSON lines written by TrackerSnapshots during training")
    a.add_argument("--out", required=True, help="output directory for the PNGs and latents.csv")
    t = sub.add_parser("toy", help="train on the planted toy and plot with ground-truth absorbers")
    t.add_argument("--criterion", default="fc", help="split criterion (default fc)")
    t.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0); with --seeds N, seeds seed..seed+N-1")
    t.add_argument("--seeds", type=int, default=1, help="runs; detector AUROCs are printed as mean +- std over them")
    t.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.what == "sae":
            letters = None
            if args.letters:
                try:
                    letters = pl.read_parquet(args.letters)
                except Exception as e:  # polars raises several types for a bad file
                    raise FcsaeInputError(f"--letters: {args.letters} is not a readable Parquet file ({e})") from None
            paths = analyse_sae(args.path, args.out, letters, snapshots=args.snapshots)
        else:
            from fcsae.config import CRITERIA

            if args.criterion not in CRITERIA:
                raise FcsaeInputError(f"--criterion: must be one of {', '.join(CRITERIA)}, got {args.criterion!r}")
            if args.seeds < 1:
                raise FcsaeInputError(f"--seeds: must be >= 1, got {args.seeds}")
            runs = [run_toy(args.criterion, steps=args.steps, seed=args.seed + i) for i in range(args.seeds)]
            res = runs[0]
            paths = write_figures(res.table, args.out, res.snapshots, 512, res.events,
                                  title=f"Planted toy, criterion {args.criterion}: ground-truth roles")
            for r in runs:
                print(json.dumps(r.absorption))
            with pl.Config(tbl_rows=-1, float_precision=3):
                print(detection_summary(runs))
    except FcsaeInputError as e:
        print(f"fcsae.analysis: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
