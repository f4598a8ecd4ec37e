"""fcsae query: tolerant loading, SQL, the five recipes, every query documented in docs/queries.md, bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import polars as pl
from polars.testing import assert_frame_equal
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fcsae.cli import main
from fcsae.errors import FcsaeInputError
from fcsae.query import RECIPES, parameter_importance, run_recipe, run_sql
from results_schema.reader import load_tables
from results_schema.schema import SCHEMA_VERSION
from tests._report_utils import FC_EFFECT, write_sweep

DOCS = Path(__file__).resolve().parents[1] / "docs" / "queries.md"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("q") / "exp", seeds=(0, 1, 2), per_cell=2)


def test_load_tables_reads_all_rows_and_letters(results):
    t = load_tables(results)
    assert t.trials.height == 19  # 3 criteria x 3 seeds x 2 + 1 failed
    assert set(t.letters["trial_id"]) <= set(t.trials["trial_id"])
    assert t.letters.height == 18 * 4  # failed trials have no letters
    assert t.problems == [] and t.schema_versions == [SCHEMA_VERSION]
    # The experiment directory works as well as its results directory.
    assert load_tables(results.parent).trials.height == 19


def test_recipes_answer_what_was_planted(results):
    t = load_tables(results)
    best = run_recipe(t, "best")
    assert best.height == 5
    vals = best["absorption.mean_absorption_fraction"].to_list()
    assert vals == sorted(vals)
    assert vals[0] == t.trials["absorption.mean_absorption_fraction"].min()

    ev = run_recipe(t, "best", metric="core.explained_variance")["core.explained_variance"].to_list()
    assert ev == sorted(ev, reverse=True)

    m = run_recipe(t, "matched-l0")
    assert set(m["criterion"]) == {"none", "dead", "fc"} and set(m["l0_bin"]) == {32.0}
    by = dict(zip(m["criterion"], m["metric_mean"]))
    # fc was planted FC_EFFECT below the others (dict sizes are sampled, so allow slack).
    assert by["fc"] < by["none"] - FC_EFFECT / 2

    letters = run_recipe(t, "letters", trial="t000")
    assert letters["letter"].to_list() == ["a", "b", "c", "d"]
    assert letters["main_latents"].to_list()[1] == [5, 9]

    failed = run_recipe(t, "failed")
    assert failed["status"].to_list() == ["failed"] and "diverged" in failed["failure_reason"][0]


def test_importance_ranks_the_planted_parameter_first(results):
    imp = parameter_importance(load_tables(results).trials, "core.explained_variance")
    # EV was planted as a function of dict_size only: a strong positive rank correlation.
    top = imp.row(0, named=True)
    assert top["parameter"] == "sae.dict_size" and top["measure"] == "spearman" and top["effect"] > 0.8
    assert set(imp["parameter"]) == {"split.criterion", "tracker.ema_alpha", "sae.dict_size", "trainer.seed"}


def _doc_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_every_documented_sql_query_runs(results):
    t = load_tables(results)
    blocks = _doc_blocks("sql")
    assert len(blocks) >= 7
    for sql in blocks:
        df = run_sql(t, sql)
        assert df.height >= 1, sql


def test_documented_recipes_match_their_sql(results):
    """The doc's SQL for best / matched-l0 / failed gives what the recipe gives."""
    t = load_tables(results)
    blocks = _doc_blocks("sql")
    assert run_sql(t, blocks[0]).equals(run_recipe(t, "best"))
    # Grouped means: polars' parallel aggregation may differ in the last bits between
    # runs (and so may the order of exact ties), so compare sorted, to a tolerance.
    keys = ["criterion", "activation", "l0_bin"]
    assert_frame_equal(run_sql(t, blocks[1]).sort(keys), run_recipe(t, "matched-l0").sort(keys),
                       check_exact=False, rel_tol=1e-9)
    assert run_sql(t, blocks[2]).equals(run_recipe(t, "letters", trial="t000"))
    failed_doc = [b for b in blocks if "failure_reason, \"split" in b][0]
    assert run_sql(t, failed_doc).equals(run_recipe(t, "failed"))


def test_documented_python_recipe_runs(results):
    (code,) = _doc_blocks("python")
    ns = {"RESULTS": results, "pl": pl}
    exec(compile(code, str(DOCS), "exec"), ns)
    assert ns["best"].height == 5 and ns["fc"].height == 7 and ns["per_seed"].height == 9


def test_cli_runs_sql_and_recipes(results, capsys):
    assert main(["query", 'SELECT COUNT(*) AS n FROM trials WHERE "split.criterion" = \'fc\'', "--results", str(results)]) == 0
    assert "7" in capsys.readouterr().out
    for name in RECIPES:
        extra = ["--trial", "t000"] if name == "letters" else []
        assert main(["query", "--recipe", name, "--results", str(results), *extra]) == 0, name
        assert capsys.readouterr().out.strip()
    assert main(["query", "--recipe", "letters", "--trial", "t000", "--format", "csv", "--results", str(results)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("b,")
    assert main(["query", "--list"]) == 0
    assert "importance" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["query", "SELECT nope FROM trials"], "query:"),
    (["query", "--recipe", "bogus"], "--recipe: unknown recipe 'bogus'"),
    (["query", "--recipe", "letters"], "--trial: required"),
    (["query", "--recipe", "letters", "--trial", "t999"], "--trial: no trial 't999'"),
    (["query", "--recipe", "best", "--metric", "status"], "--metric:"),
    (["query", "SELECT 1", "--recipe", "best"], "either SQL or --recipe"),
    (["query", "SELECT 1", "--format", "xml"], "--format:"),
])
def test_cli_bad_input_one_line_exit_2(results, capsys, argv, needle):
    assert main([*argv, "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_bad_files_are_skipped_and_named(tmp_path):
    results = write_sweep(tmp_path / "exp", seeds=(0,), n_failed=0)
    (results / "zz_torn.parquet").write_bytes(b"PAR1 not really")
    # A future major schema version: readers must refuse it, by name.
    table = pa.table({"trial_id": ["x"], "status": ["ok"]}).replace_schema_metadata({b"fcsae.schema_version": b"9.0"})
    pq.write_table(table, results / "zz_future.parquet")
    t = load_tables(results)
    assert t.trials.height == 3
    assert len(t.problems) == 2
    assert any("zz_torn.parquet" in p for p in t.problems) and any("zz_future.parquet" in p and "9.0" in p for p in t.problems)


def test_nothing_readable_is_an_input_error(tmp_path):
    with pytest.raises(FcsaeInputError, match="does not exist"):
        load_tables(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FcsaeInputError, match="no result files"):
        load_tables(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "t0.parquet").write_text("garbage")
    with pytest.raises(FcsaeInputError, match="t0.parquet"):
        load_tables(tmp_path / "bad")


def test_importance_says_when_eta_squared_is_meaningless(tmp_path):
    """One trial per criterion (the quickstart) makes eta squared 1.0 by construction: reported as NaN with the reason."""
    trials = pl.DataFrame({"status": ["ok"] * 3, "split.criterion": ["none", "dead", "fc"],
                           "searched_params": [["split.criterion"]] * 3,
                           "absorption.mean_absorption_fraction": [0.01, 0.02, 0.015]})
    imp = parameter_importance(trials).row(0, named=True)
    assert imp["measure"] == "meaningless: one trial per value" and math.isnan(imp["effect"])
