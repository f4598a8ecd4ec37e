"""``fcsae-report``: a self-contained report of a sweep (Markdown + PNG figures + one HTML file with them inlined).

Reads the result tables with ``results_schema.reader.load_tables`` (validated
per-file reads; unreadable files are skipped and named), then builds
each section independently: a section that fails is replaced by a line saying
why, and the rest still builds. The report says when the sweep is partial
(rows missing against the space's ``num_samples``, trial directories without a
row, a driver that may still be running).

Layout written (atomically: built in a temporary directory, then swapped in)::

    OUT/report.md   OUT/report.html   OUT/figures/*.png   OUT/tables/*.csv
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import polars as pl

import fcsae
from fcsae.errors import FcsaeInputError
from fcsae.plotting import axis_label, save_png
from fcsae.query import parameter_importance, searched_params
from fcsae.report import figures as figs
from fcsae.report import tables as rt
from results_schema.reader import ResultTables, load_tables

log = logging.getLogger(__name__)

DEFAULT_OBJECTIVES = [(rt.ABSORPTION, "min"), ("absorption.mean_full_absorption", "min"), (rt.EV, "max"),
                      ("core.ce_loss_score", "max")]
"""Objectives reported when the experiment's sweep.json is not found (those with data)."""


class Block(NamedTuple):
    """One element of the report: ``kind`` is h1, h2, p, bullets, table or figure."""

    kind: str
    content: object
    caption: str = ""


class Context(NamedTuple):
    """What every section builder gets."""

    tables: ResultTables
    ok: pl.DataFrame
    objectives: list[tuple[str, str]]
    sweep: dict | None
    experiment: Path | None
    out: Path


class ReportResult(NamedTuple):
    """What ``build_report`` wrote and what went wrong on the way."""

    out_dir: Path
    markdown: Path
    html: Path
    figures: list[Path]
    problems: list[str]
    partial: bool


def _experiment_of(results_dir: Path) -> Path | None:
    parent = results_dir.parent
    return parent if (parent / "sweep.json").is_file() or results_dir.name == "results" else None


def _sweep_meta(experiment: Path | None, problems: list[str]) -> dict | None:
    if experiment is None or not (experiment / "sweep.json").is_file():
        return None
    try:
        return json.loads((experiment / "sweep.json").read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{experiment / 'sweep.json'}: unreadable ({e}); objectives and expected trial count unknown")
        return None


def _objectives(sweep: dict | None, ok: pl.DataFrame) -> list[tuple[str, str]]:
    raw = ((sweep or {}).get("space") or {}).get("objectives") or []
    objs = [(o["metric"], o["mode"]) for o in raw if isinstance(o, dict) and o.get("mode") in ("min", "max")]
    objs = objs or DEFAULT_OBJECTIVES
    return [(m, mode) for m, mode in objs if rt.metric_present(ok, m)]


# ------------------------------------------------------------------ sections


def _status(ctx: Context) -> list[Block]:
    t = ctx.tables.trials
    counts = {s: t.filter(pl.col("status") == s).height for s in ("ok", "failed", "pruned")}
    expected = ((ctx.sweep or {}).get("space") or {}).get("num_samples")
    lines = [f"Trial rows: {t.height} ({counts['ok']} ok, {counts['failed']} failed, {counts['pruned']} pruned)"
             + (f" of {expected} asked for." if expected else "; the number asked for is unknown (no sweep.json).")]
    if ctx.experiment is not None and (ctx.experiment / "trials").is_dir():
        with_row = set(t["trial_id"].to_list())
        no_row = sorted(p.name for p in (ctx.experiment / "trials").iterdir() if p.is_dir() and p.name not in with_row)
        if no_row:
            lines.append(f"{len(no_row)} trial directories have no result row yet (running or interrupted): "
                         + ", ".join(no_row[:10]) + (" ..." if len(no_row) > 10 else ""))
    if ctx.experiment is not None and (ctx.experiment / "ray_pids.json").exists():
        lines.append("ray_pids.json is present: the sweep's driver may still be running (or was killed).")
    lines.append(f"Schema versions of the rows: {', '.join(ctx.tables.schema_versions) or 'none'}.")
    if _partial(ctx):
        lines.insert(0, "**PARTIAL RESULTS**: this sweep is still running or was interrupted; "
                        "every number below covers only the finished trials.")
    return [Block("h2", "Status"), Block("bullets", lines)]


def _partial(ctx: Context) -> bool:
    expected = ((ctx.sweep or {}).get("space") or {}).get("num_samples")
    if expected and ctx.tables.trials.height < expected:
        return True
    if ctx.experiment is not None and (ctx.experiment / "trials").is_dir():
        with_row = set(ctx.tables.trials["trial_id"].to_list())
        if any(p.is_dir() and p.name not in with_row for p in (ctx.experiment / "trials").iterdir()):
            return True
    return ctx.experiment is not None and (ctx.experiment / "ray_pids.json").exists()


def _best(ctx: Context) -> list[Block]:
    blocks = [Block("h2", "Best trials per objective")]
    extra = [p for p in searched_params(ctx.tables.trials) if p not in (rt.CRITERION, rt.SEED)]
    for metric, mode in ctx.objectives:
        blocks.append(Block("table", rt.best_trials(ctx.ok, metric, mode, extra=extra),
                            f"Top 5 by `{metric}` ({'lowest' if mode == 'min' else 'highest'} first)"))
    return blocks


def _grid_names(sweep: dict | None, trials: pl.DataFrame) -> list[str]:
    """The grid's fields, as the driver recorded them in sweep.json (``SweepSpec.grid_names``); for an experiment
    made before that record, the criterion and, when trials differ in it, the architecture (the arms of every
    committed space)."""
    names = (sweep or {}).get("grid_names")
    if isinstance(names, list):
        return list(names)
    varies = rt.ACTIVATION in trials.columns and trials[rt.ACTIVATION].n_unique() > 1
    return [rt.ACTIVATION, rt.CRITERION] if varies else [rt.CRITERION]


def _arms(ctx: Context) -> list[Block]:
    """One row per arm (the grid's combinations other than the seed): the sweep's end-of-run summary, with its verdict."""
    from fcsae.report import summary as sm

    if ctx.tables.trials.height == 0 or sm.ABSORPTION not in ctx.tables.trials.columns:
        return []
    keys = sm.arm_keys(_grid_names(ctx.sweep, ctx.tables.trials), ctx.tables.trials)
    frame = sm.summary_frame(ctx.tables.trials, keys)
    metrics = [m for m in sm.COLUMNS if m in frame.columns]
    table = frame.select(*keys, "n", "failed", pl.col("absorption").alias("absorption mean"), pl.col("sd").alias("absorption sd"),
                         pl.col("lo").alias("95% lo"), pl.col("hi").alias("95% hi"), pl.col("interval").alias("interval from"),
                         *[pl.col(m).alias(sm.COLUMNS[m][0]) for m in metrics])
    key = "; ".join(f"{sm.COLUMNS[m][0]}: {sm.COLUMNS[m][1]}" for m in metrics)
    return [Block("h2", "Per arm"),
            Block("p", "One row per arm (the grid's combinations other than the seed), means over its ok trials; the 95% "
                       "interval is a t interval over the arm's trials (`trials`), or one trial's bootstrap over words "
                       f"(`words`). {key}."),
            Block("table", table, "Per arm"), Block("p", sm.verdict(frame, keys))]


def _comparison(ctx: Context) -> list[Block]:
    metrics = [m for m in (rt.ABSORPTION, "absorption.mean_full_absorption", rt.EV, rt.L0) if rt.metric_present(ctx.ok, m)]
    cmp = rt.criterion_comparison(ctx.ok, metrics)
    if cmp.height == 0:
        return [Block("h2", "Baseline vs split criteria"), Block("p", "No ok trials with a split criterion and metrics.")]
    text = ("Means over seeds (each seed's trials averaged first), std across seeds; Δ is the difference from "
            f"`{rt.BASELINE}` with the standard error of that difference. Other searched parameters are pooled, "
            "so a difference can also come from how they were sampled per criterion. With several architectures, "
            "criteria are compared within each architecture that has more than one, against its own baseline.")
    return [Block("h2", "Baseline vs split criteria"), Block("p", text + _absorption_validity(ctx.ok)),
            Block("table", cmp, "Per criterion"),
            Block("bullets", rt.comparison_sentences(cmp, metrics[0]), f"Reading on `{metrics[0]}`")]


def _absorption_validity(ok) -> str:
    """One sentence when trials' absorption scores are flagged not meaningful (``absorption.meaningful``)."""
    if "absorption.meaningful" not in ok.columns:
        return ""
    flags = ok["absorption.meaningful"].drop_nulls()
    bad = int((~flags).sum())
    if bad == 0:
        return ""
    return (f" **{bad} of {flags.len()} trials' absorption scores are flagged not meaningful** (too few letters "
            "pass the probe, or fewer than half the letters have a latent that alone detects them: "
            "`absorption.letters_with_latent`), so their absorption means say little about absorption.")


def _architectures(ctx: Context) -> list[Block]:
    metrics = [m for m in (rt.ABSORPTION, "absorption.mean_full_absorption", rt.EV, rt.L0) if rt.metric_present(ctx.ok, m)]
    table = rt.architecture_comparison(ctx.ok, metrics)
    if table.height == 0:
        return []  # one architecture: the criteria comparison says it all
    text = (f"Architectures (`sae.activation`) compared at matched measured L0: trials grouped into "
            f"{rt.L0_BIN_TEXT} (`{rt.L0}`, the inference code's L0, not the nominal k), then per "
            "criterion; means over seeds, std across seeds.")
    blocks = [Block("h2", "Architectures at matched L0"), Block("p", text), Block("table", table, "Per L0 bin, architecture and criterion")]
    lines = rt.architecture_sentences(table, metrics[0])
    if lines:
        blocks.append(Block("bullets", lines, f"Reading on `{metrics[0]}` (each architecture's `{rt.BASELINE}` vs {rt.BASE_ACTIVATION}'s)"))
    return blocks


def _pareto(ctx: Context) -> list[Block]:
    blocks = [Block("h2", "Pareto fronts")]
    if not rt.metric_present(ctx.ok, rt.ABSORPTION):
        return blocks + [Block("p", "No absorption results: no Pareto front of absorption.")]
    for other, mode, name in ((rt.EV, "max", "pareto_absorption_ev"), (rt.L0, "min", "pareto_absorption_l0")):
        if not rt.metric_present(ctx.ok, other):
            blocks.append(Block("p", f"No `{other}` values: front of absorption vs {other} skipped."))
            continue
        d = ctx.ok.filter(pl.col(rt.ABSORPTION).is_not_null() & pl.col(other).is_not_null())
        if d[other].n_unique() == 1:  # a line of points: no trade-off to draw
            blocks.append(Block("p", f"Every trial has `{other}` = {d[other][0]:.4g}: no front of absorption vs "
                                     f"{other} to plot (absorption alone orders them; see the best-trials table)."))
            continue
        mask = rt.pareto_mask(d[rt.ABSORPTION].to_list(), d[other].to_list(), "min", mode)
        path = save_png(figs.pareto_figure(d, rt.ABSORPTION, other, mask, "min", mode), ctx.out / "figures" / f"{name}.png")
        blocks.append(Block("figure", path, f"Absorption (lower is better) vs {axis_label(other)}; ringed: Pareto-optimal"))
        front = rt.best_trials(d.filter(pl.Series(mask)), rt.ABSORPTION, "min", n=50)
        blocks.append(Block("table", front, f"Trials on the front of absorption vs `{other}`"))
    return blocks


def _effects(ctx: Context) -> list[Block]:
    blocks = [Block("h2", "Effect of each searched parameter")]
    metrics = [m for m, _ in ctx.objectives[:2]] or [rt.EV]
    params = searched_params(ctx.tables.trials)
    if not params:
        return blocks + [Block("p", "The rows name no searched parameters.")]
    imp = pl.concat([parameter_importance(ctx.tables.trials, m).with_columns(pl.lit(m).alias("metric")) for m in metrics])
    blocks.append(Block("table", imp, "Spearman rank correlation (numeric) or eta squared (categorical) over ok trials"))
    for p in params:
        if p == rt.SEED:
            continue
        n_values = ctx.ok[p].n_unique()
        categorical = not ctx.ok.schema[p].is_numeric() or n_values <= 6
        fig = (figs.categorical_effect_figure if categorical else figs.numeric_effect_figure)(ctx.ok, p, metrics)
        path = save_png(fig, ctx.out / "figures" / f"effect_{re.sub(r'[^A-Za-z0-9_]', '_', p)}.png")
        blocks.append(Block("figure", path, f"`{p}`: " + ("dots = seeds, diamond = mean, bar = range across seeds" if categorical
                                                            else "dots = trials, diamonds = quartile-bin means, bars = range across seeds")))
        data, key = (ctx.ok, p) if categorical else (rt.with_bins(ctx.ok, p), "bin")
        stats = pl.concat([rt.seed_stats(data, key, m).with_columns(pl.col(key).cast(pl.Utf8).alias(p), pl.lit(m).alias("metric"))
                           .select(p, "metric", "n_trials", "n_seeds", "mean", "std", "se") for m in metrics])
        what = "grouped" if categorical else "quartile-bin"
        blocks.append(Block("table", stats, f"`{p}`: {what} means (std and SE across seeds)"))
    return blocks


def _letters(ctx: Context) -> list[Block]:
    blocks = [Block("h2", "Per-letter absorption")]
    stats = rt.letter_stats(ctx.ok, ctx.tables.letters)
    if stats.height == 0:
        return blocks + [Block("p", "No per-letter absorption rows for the ok trials.")]
    path = save_png(figs.letters_figure(stats), ctx.out / "figures" / "letters_absorption.png")
    return blocks + [Block("figure", path, "Per-letter absorption fraction, baseline vs each split criterion"),
                     Block("table", rt.letters_wide(stats), "Mean [min, max] across trials, per letter and criterion")]


def _events(ctx: Context) -> list[Block]:
    blocks = [Block("h2", "Split events over training")]
    curves, n_read = rt.event_curves(ctx.ok)
    if n_read:
        path = save_png(figs.split_events_figure(curves), ctx.out / "figures" / "split_events.png")
        note = f"From the event logs of {n_read} of {ctx.ok.height} ok trials."
        return blocks + [Block("figure", path, "Cumulative split + resample events"), Block("p", note)]
    if not {"n_split_events", "n_resample_events"} <= set(ctx.ok.columns):
        return blocks + [Block("p", "No event logs and no event counts.")]
    path = save_png(figs.event_counts_figure(ctx.ok), ctx.out / "figures" / "event_counts.png")
    return blocks + [Block("p", "No trial's events.jsonl is reachable from here: counts from the result rows instead."),
                     Block("figure", path, "Split and resample events per trial")]


def _fc_patterns(ctx: Context) -> list[Block]:
    """f_i vs c_i of the best trial per criterion whose saved SAE carries tracker state (main latents from its letters)."""
    from fcsae.analysis import fc_scatter_figure, latent_roles, latent_table, load_tracked_sae, main_latents

    blocks = [Block("h2", "Frequency-consistency patterns")]
    if not {"sae_path", rt.CRITERION} <= set(ctx.ok.columns) or not rt.metric_present(ctx.ok, rt.ABSORPTION):
        return blocks + [Block("p", "No saved SAEs or no absorption results in the rows.")]
    shown, skipped = 0, 0
    for crit in figs.group_values(ctx.ok, rt.CRITERION):
        best = rt.best_trials(ctx.ok.filter(pl.col(rt.CRITERION) == crit), rt.ABSORPTION, "min", n=1)
        if best.height == 0:
            continue
        tid = best["trial_id"].item()
        sae_path = ctx.ok.filter(pl.col("trial_id") == tid)["sae_path"].item()
        if not sae_path or not Path(sae_path).is_dir():
            skipped += 1
            continue
        try:
            t = load_tracked_sae(sae_path)
        except FcsaeInputError:  # no tracker state (e.g. criterion none without tracker.enabled)
            skipped += 1
            continue
        letters = ctx.tables.letters.filter(pl.col("trial_id") == tid)
        table = latent_table(t.tracker.scores(), latent_roles(t.sae.cfg.dict_size, main_latents(letters)))
        fig = fc_scatter_figure(table, f"{crit}: trial {tid} (lowest absorption of its criterion)")
        path = save_png(fig, ctx.out / "figures" / f"fc_scatter_{re.sub(r'[^A-Za-z0-9_]', '_', crit)}.png")
        blocks.append(Block("figure", path, f"f_i vs c_i, `{crit}` trial `{tid}`; blue = the letters' main latents"))
        shown += 1
    if not shown:
        return blocks + [Block("p", f"No best-per-criterion trial has a reachable SAE with tracker state ({skipped} checked).")]
    if skipped:
        blocks.append(Block("p", f"{skipped} criteria's best trials have no reachable SAE with tracker state."))
    return blocks


SECTIONS: list[tuple[str, Callable[[Context], list[Block]]]] = [
    ("status", _status), ("per arm", _arms), ("best trials", _best), ("criteria comparison", _comparison),
    ("architectures", _architectures), ("Pareto fronts", _pareto),
    ("parameter effects", _effects), ("per-letter absorption", _letters), ("split events", _events),
    ("frequency-consistency patterns", _fc_patterns),
]


# ------------------------------------------------------------------ rendering


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return str(v)


def _md_table(df: pl.DataFrame) -> str:
    if df.height == 0:
        return "_(no rows)_"
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |\n" for row in df.iter_rows())


def render_markdown(blocks: list[Block], out: Path) -> str:
    """The report as Markdown; figures are linked relative to ``out``."""
    parts = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            parts.append(("# " if b.kind == "h1" else "## ") + str(b.content))
        elif b.kind == "p":
            parts.append(str(b.content))
        elif b.kind == "bullets":
            parts.append((f"{b.caption}:\n\n" if b.caption else "") + "\n".join(f"- {x}" for x in b.content))
        elif b.kind == "table":
            parts.append((f"**{b.caption}**\n\n" if b.caption else "") + _md_table(b.content))
        elif b.kind == "figure":
            parts.append(f"![{b.caption}]({Path(b.content).relative_to(out).as_posix()})\n\n*{b.caption}*")
    return "\n\n".join(parts) + "\n"


def render_html(blocks: list[Block]) -> str:
    """The report as one HTML file with the figures inlined (base64), so it can be mailed or archived alone."""
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{html.escape(str(b.content))}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(str(b.content))}</p>")
        elif b.kind == "bullets":
            cap = f"<p>{html.escape(b.caption)}:</p>" if b.caption else ""
            body.append(cap + "<ul>" + "".join(f"<li>{html.escape(str(x))}</li>" for x in b.content) + "</ul>")
        elif b.kind == "table":
            df = b.content
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in df.iter_rows())
            head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
            body.append(f"<p><b>{html.escape(b.caption)}</b></p><table><tr>{head}</tr>{rows}</table>")
        elif b.kind == "figure":
            data = base64.b64encode(Path(b.content).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(b.caption)}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _write_tables(blocks: list[Block], out: Path) -> None:
    for i, b in enumerate(b for b in blocks if b.kind == "table" and b.content.height):
        df = b.content
        lists = [c for c, t in df.schema.items() if isinstance(t, pl.List)]
        df = df.with_columns(pl.col(c).cast(pl.List(pl.Utf8)).list.join(" ") for c in lists)
        slug = re.sub(r"[^a-z0-9]+", "_", b.caption.lower()).strip("_")[:50] or "table"
        df.write_csv(out / "tables" / f"{i:02d}_{slug}.csv")


MANIFEST = ".fcsae-report.json"
"""The files a report directory's last build wrote (relative paths): a rebuild replaces those and keeps the rest."""
OWN_TOP = ("report.md", "report.html")
OWN_DIRS = ("figures", "tables")


def _own_files(out: Path) -> set[str]:
    """What fcsae-report wrote in an earlier report directory: its manifest's list, else (reports built before the
    manifest existed) ``report.md``, ``report.html`` and the files under ``figures/`` and ``tables/``."""
    try:
        listed = json.loads((out / MANIFEST).read_text())["files"]
        if isinstance(listed, list) and all(isinstance(f, str) for f in listed):
            return set(listed) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    own = {f for f in OWN_TOP if (out / f).is_file()}
    for d in OWN_DIRS:
        own |= {p.relative_to(out).as_posix() for p in (out / d).rglob("*") if p.is_file()} if (out / d).is_dir() else set()
    return own


def _write_manifest(tmp: Path) -> None:
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")


def _foreign_files(out: Path, tmp: Path) -> list[Path]:
    """The files of ``out`` that fcsae-report did not write (relative paths); refuse when one has the path of a file
    the new report in ``tmp`` writes."""
    own = _own_files(out)
    foreign = [p.relative_to(out) for p in sorted(out.rglob("*")) if p.is_file() and p.relative_to(out).as_posix() not in own]
    clash = [p for p in foreign if (tmp / p).exists()]
    if clash:
        raise FcsaeInputError(f"--out: {out / clash[0]} was not written by fcsae-report but the new report writes "
                              "that path; move it, or give another --out")
    return foreign


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` directory, keeping every file fcsae-report did not write there.

    The old directory is set aside, the new one renamed in, the foreign files
    moved over, and only then is the old one removed: a failure on the way
    leaves them in the set-aside directory, never deleted.
    """
    _write_manifest(tmp)
    if not out.exists():
        tmp.rename(out)
        return
    foreign = _foreign_files(out, tmp)
    old = out.with_name(f".{out.name}.old-{dt.datetime.now():%H%M%S%f}")
    out.rename(old)
    tmp.rename(out)
    for rel in foreign:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).rename(out / rel)
    shutil.rmtree(old, ignore_errors=True)


def default_out_dir(results_dir: Path) -> Path:
    """``<experiment>/report`` for ``<experiment>/results``, else ``RESULTS_DIR/report``."""
    return results_dir.parent / "report" if results_dir.name == "results" else results_dir / "report"


def build_report(results: str | Path, out: str | Path | None = None) -> ReportResult:
    """Build the report of the sweep whose results are in ``results`` (results or experiment directory).

    Raises ``FcsaeInputError`` only when nothing can be built (no readable
    trial row); every other problem is listed in the report and returned.
    """
    tables = load_tables(results)
    problems = list(tables.problems)
    experiment = _experiment_of(tables.results_dir)
    sweep = _sweep_meta(experiment, problems)
    out = Path(out).expanduser().resolve() if out else default_out_dir(tables.results_dir).resolve()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "figures").mkdir()
        (tmp / "tables").mkdir()
        ok = rt.ok_trials(tables.trials)
        ctx = Context(tables, ok, _objectives(sweep, ok), sweep, experiment, tmp)
        name = (sweep or {}).get("name") or (tables.trials["sweep_name"].drop_nulls().head(1).to_list() or ["sweep"])[0]
        blocks = [Block("h1", f"fcsae sweep report: {name}"),
                  Block("p", f"Results: `{tables.results_dir}`; sweep id "
                             f"{', '.join(tables.trials['sweep_id'].drop_nulls().unique().sort().to_list()) or 'unknown'}; "
                             f"generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} by fcsae-report "
                             f"{fcsae.__version__}.")]
        section_problems = []
        for title, section in SECTIONS:
            try:
                blocks += section(ctx)
            except Exception as e:  # one section's failure must not cost the others
                log.warning("report section %r failed: %s", title, e, exc_info=log.isEnabledFor(logging.DEBUG))
                section_problems.append(f"section '{title}' could not be built: {type(e).__name__}: {e}")
                blocks += [Block("h2", title.capitalize()), Block("p", f"Could not be built: {type(e).__name__}: {e}")]
        problems += section_problems
        if problems:
            blocks[2:2] = [Block("h2", "Problems"), Block("bullets", problems, "Skipped or failed while building")]
        (tmp / "report.md").write_text(render_markdown(blocks, tmp))
        (tmp / "report.html").write_text(render_html(blocks))
        _write_tables(blocks, tmp)
        partial = _partial(ctx)
        figures = sorted(p.name for p in (tmp / "figures").glob("*.png"))
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReportResult(out, out / "report.md", out / "report.html", [out / "figures" / f for f in figures], problems, partial)


def check_out_dir(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty directory that is not an earlier report (it is replaced)."""
    if out.exists() and not out.is_dir():
        raise FcsaeInputError(f"--out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.md").exists():
        raise FcsaeInputError(f"--out: {out} is a non-empty directory that holds no report.md; "
                              "give a new or an earlier report's directory (it is replaced)")
