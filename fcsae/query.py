"""Query a sweep's result tables with polars SQL; the common questions as named recipes.

The tables come from ``results_schema.reader.load_tables`` (the one reader):

- ``trials``: one row per finished trial (``results_schema.schema.TRIAL_SCHEMA``);
- ``letters``: the per-letter absorption rows (``PER_LETTER_SCHEMA``) of those
  trials, joined to ``trials`` on ``trial_id``.

Files that cannot be read are skipped there, with one problem line each.
Dotted column names must be double-quoted in SQL: ``"split.criterion"``.
The recipes are documented, with their SQL, in docs/queries.md.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import polars as pl

from fcsae.errors import FcsaeInputError
from results_schema.reader import ResultTables

DEFAULT_METRIC = "absorption.mean_absorption_fraction"
"""Metric the recipes rank and explain by default (lower is better)."""
L0_BINS_PER_OCTAVE = 4
L0_BIN_SQL = f'ROUND(POWER(2, ROUND(LOG2("core.l0") * {L0_BINS_PER_OCTAVE}) / {L0_BINS_PER_OCTAVE}), 1)'
"""The measured-L0 bin that counts as "matched sparsity" (the one definition; the report runs it with
``pl.sql_expr``): a quarter octave wide, centred on the powers of two users pick k from, so 29.3-34.9 is
the bin 32. Equal-width bins of 4 had an edge at 30, where BatchTopK SAEs with k 32 land (29.7-30.7), and
split their seeds across two bins."""
L0_BIN_TEXT = "quarter-octave bins of measured L0 centred on powers of two (29.3-34.9 is the bin 32)"
"""How ``L0_BIN_SQL`` bins, in words (recipe help and report text)."""


def run_sql(tables: ResultTables, sql: str) -> pl.DataFrame:
    """Run a polars SQL query over the tables ``trials`` and ``letters``."""
    ctx = pl.SQLContext(trials=tables.trials, letters=tables.letters, eager=True)
    try:
        return ctx.execute(sql)
    except Exception as e:  # polars raises SQLInterfaceError, ColumnNotFoundError, ... for a bad query
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FcsaeInputError(f"query: {first} (tables: trials, letters; quote dotted columns, e.g. \"split.criterion\")") from None


# ------------------------------------------------------------------ recipes


BEST_COLUMNS = ["trial_id", "split.criterion", "trainer.seed", "sae.dict_size", "core.l0", "core.explained_variance"]
"""Columns the ``best`` recipe shows, before its metric."""
BEST_SQL = """
SELECT {columns}
FROM trials
WHERE status = 'ok' AND "{metric}" IS NOT NULL
ORDER BY "{metric}" {order}, trial_id
LIMIT 5
"""

MATCHED_L0_SQL = """
SELECT "split.criterion" AS criterion,
       "sae.activation" AS activation,
       {l0_bin} AS l0_bin,
       COUNT(*) AS n_trials,
       COUNT(DISTINCT "trainer.seed") AS n_seeds,
       AVG("{metric}") AS metric_mean,
       STDDEV("{metric}") AS metric_std,
       AVG("core.explained_variance") AS explained_variance_mean
FROM trials
WHERE status = 'ok' AND "{metric}" IS NOT NULL AND "core.l0" IS NOT NULL
GROUP BY criterion, activation, l0_bin
ORDER BY l0_bin, metric_mean, criterion, activation
"""

LETTERS_SQL = """
SELECT letter, probe_f1, num_split_features, main_latents, num_probe_true_positives,
       mean_absorption_fraction, full_absorption_rate
FROM letters
WHERE trial_id = '{trial}'
ORDER BY letter
"""

FAILED_SQL = """
SELECT trial_id, status, failure_reason, "split.criterion", "trainer.seed", finished_at
FROM trials
WHERE status <> 'ok'
ORDER BY finished_at, trial_id
"""


def searched_params(trials: pl.DataFrame) -> list[str]:
    """Dotted names of the parameters any trial searched (from the ``searched_params`` column), sorted."""
    names = trials["searched_params"].explode().drop_nulls().unique().to_list() if "searched_params" in trials.columns else []
    return sorted(n for n in names if n in trials.columns)


def _eta_squared(df: pl.DataFrame, param: str, metric: str) -> float:
    """Fraction of the metric's variance explained by the parameter's groups (one-way ANOVA effect size)."""
    y = df[metric]
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 0:
        return float("nan")
    g = df.group_by(param).agg(pl.len().alias("n"), pl.col(metric).mean().alias("m"))
    between = float((g["n"] * (g["m"] - y.mean()) ** 2).sum())
    return between / total


def parameter_importance(trials: pl.DataFrame, metric: str = DEFAULT_METRIC) -> pl.DataFrame:
    """Per searched parameter, how much it moves ``metric`` over the ok trials.

    Numeric parameters with more than 3 distinct values: Spearman rank
    correlation (``effect`` in [-1, 1], its sign the direction). Categorical or
    few-valued ones: eta squared, the share of the metric's variance between
    the parameter's groups (``effect`` in [0, 1]); NaN with a ``measure`` saying
    why when it would be meaningless (one trial per value, too few trials). Sorted by |effect|.
    """
    if metric not in trials.columns:
        raise FcsaeInputError(f"--metric: {metric!r} is not a column of the trial table")
    ok = trials.filter((pl.col("status") == "ok") & pl.col(metric).is_not_null() & pl.col(metric).is_not_nan())
    rows = []
    for p in searched_params(trials):
        d = ok.filter(pl.col(p).is_not_null()).select(p, metric)
        n_values = d[p].n_unique()
        numeric = d.schema[p].is_numeric() and n_values > 3
        if d.height < 3 or n_values < 2:
            effect, kind = float("nan"), "constant" if n_values < 2 else "too few trials"
        elif not numeric and d.height == n_values:  # every group one trial: eta squared is 1 by construction
            effect, kind = float("nan"), "meaningless: one trial per value"
        elif numeric:
            effect = float(d.select(pl.corr(p, metric, method="spearman")).item())
            kind = "spearman"
        else:
            effect, kind = _eta_squared(d, p, metric), "eta_squared"
        rows.append({"parameter": p, "measure": kind, "effect": effect, "n_trials": d.height, "n_values": n_values})
    out = pl.DataFrame(rows, schema={"parameter": pl.Utf8, "measure": pl.Utf8, "effect": pl.Float64,
                                     "n_trials": pl.Int64, "n_values": pl.Int64})
    return out.sort(pl.col("effect").abs().fill_nan(-1.0), descending=True, nulls_last=True)


class Recipe(NamedTuple):
    """A named query: what it answers and how it runs."""

    help: str
    run: Callable[..., pl.DataFrame]


def _order(metric: str) -> str:
    """Lower is better for absorption, loss, mse, kl and dead/dense fractions; higher for the rest."""
    lower = ("absorption", "mse", "loss", "kl_div_sae", "kl_div_zero", "frac_dead", "frac_dense", "l0", "l1")
    return "ASC" if any(t in metric for t in lower) and "score" not in metric else "DESC"


def _check_metric(tables: ResultTables, metric: str) -> None:
    if metric not in tables.trials.columns or tables.trials.schema[metric] != pl.Float64:
        raise FcsaeInputError(f"--metric: {metric!r} is not a metric column; allowed: core.* or absorption.* columns")


def _best(tables, metric=DEFAULT_METRIC, **_):
    _check_metric(tables, metric)
    cols = ", ".join(c if c == "trial_id" else f'"{c}"' for c in dict.fromkeys([*BEST_COLUMNS, metric]))
    return run_sql(tables, BEST_SQL.format(columns=cols, metric=metric, order=_order(metric)))


def _matched_l0(tables, metric=DEFAULT_METRIC, **_):
    _check_metric(tables, metric)
    return run_sql(tables, MATCHED_L0_SQL.format(metric=metric, l0_bin=L0_BIN_SQL))


def _letters(tables, trial=None, **_):
    if not trial:
        raise FcsaeInputError("--trial: required by recipe 'letters' (a trial_id; see recipe 'best')")
    if trial not in tables.trials["trial_id"].to_list():
        raise FcsaeInputError(f"--trial: no trial {trial!r} in {tables.results_dir}")
    return run_sql(tables, LETTERS_SQL.format(trial=trial.replace("'", "''")))


def _failed(tables, **_):
    return run_sql(tables, FAILED_SQL)


def _importance(tables, metric=DEFAULT_METRIC, **_):
    _check_metric(tables, metric)
    return parameter_importance(tables.trials, metric)


RECIPES: dict[str, Recipe] = {
    "best": Recipe("the 5 best ok trials by --metric (absorption: lowest first)", _best),
    "matched-l0": Recipe(f"each split criterion's and architecture's mean/std of --metric within {L0_BIN_TEXT}", _matched_l0),
    "letters": Recipe("one trial's per-letter absorption table (--trial ID)", _letters),
    "failed": Recipe("failed and pruned trials with the reason", _failed),
    "importance": Recipe("each searched parameter's effect on --metric (Spearman rho or eta squared)", _importance),
}
"""The five questions users ask most, by name (``fcsae query --recipe NAME``)."""


def run_recipe(tables: ResultTables, name: str, metric: str = DEFAULT_METRIC, trial: str | None = None) -> pl.DataFrame:
    """Run the named recipe (see ``RECIPES``)."""
    if name not in RECIPES:
        raise FcsaeInputError(f"--recipe: unknown recipe {name!r}; allowed: {', '.join(RECIPES)}")
    return RECIPES[name].run(tables, metric=metric, trial=trial)


def format_table(df: pl.DataFrame, fmt: str = "table") -> str:
    """``df`` as an aligned text table, CSV or JSON lines."""
    if fmt == "csv":
        # CSV cannot hold list columns (main_latents): write them as space-separated ids.
        lists = [c for c, t in df.schema.items() if isinstance(t, pl.List)]
        flat = df.with_columns(pl.col(c).cast(pl.List(pl.Utf8)).list.join(" ") for c in lists)
        return flat.write_csv()
    if fmt == "json":
        return df.write_ndjson()
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, fmt_str_lengths=80, float_precision=4,
                   tbl_hide_dataframe_shape=True):
        return str(df)

