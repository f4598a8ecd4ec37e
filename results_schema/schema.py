"""The result table's contract: ``SCHEMA_VERSION`` and the explicit column list of both tables.

One row per trial (``TRIAL_SCHEMA``) and one row per (trial, letter) of the
first-letter absorption eval (``PER_LETTER_SCHEMA``, the child table, joined on
``trial_id``). Column names:

- bookkeeping columns (``sweep_id``, ``trial_id``, ``status`` ...);
- the config fields, by their dotted names (``split.criterion``,
  ``tracker.ema_alpha``, ``sae.dict_size``, ``trainer.seed`` ...), listed in
  ``CONFIG_FIELDS``, so a row says exactly what was trained whether or not the
  field was searched; the docstring of such a column is the config field's own
  docstring;
- metrics as ``core.<name>`` and ``absorption.<name>`` (``CORE_COLUMNS``,
  ``ABSORPTION_COLUMNS``; null when an eval did not run or the trial failed).

Every column is written out below; nothing is derived from the config classes
but the config columns' docstrings. ``results_schema/versions.json`` holds the
frozen column names and types of every released version, and
``tests/results_schema/test_schema_version.py`` fails when the columns differ
from the frozen list of ``SCHEMA_VERSION`` or a config field has no column.

How to add a column (a new config field or metric):

1. add it to the list it belongs to (``CONFIG_FIELDS`` for a config field, with
   its pyarrow type; ``CORE_COLUMNS``/``ABSORPTION_COLUMNS``/``_TRAINING`` ...
   with a docstring otherwise); readers match columns by name, so the place
   in the list is free;
2. bump ``SCHEMA_VERSION``'s MINOR (``1.6`` -> ``1.7``): old files then read
   with the new column null;
3. run ``.venv/bin/python -m results_schema.schema --freeze`` to add the new
   version's column list to ``versions.json`` (it refuses to change a version
   already frozen), and commit both files.

Renaming, removing or retyping a column is a MAJOR bump (readers refuse files
of another major), except widening int64 to double (``MINOR_WIDENINGS``): the
reader casts the older files' integers (1.1 widened ``sae.k`` for
batchtopk's fractional k).

History: 1.0 the first release; 1.1 batchtopk/matryoshka fields (``sae.k`` widened to double);
1.2 ``failure_detail``; 1.3 absorption interval/meaningfulness columns; 1.4 ``trainer.bf16_encoder``;
1.5 ``split.operation``; 1.6 ``split.sibling_cos`` (the extract operation and the detectors).

Versioning: ``MAJOR.MINOR``. A minor bump only adds nullable columns, so readers
accept any minor of a major they know; a new major means a changed meaning or
type, and readers refuse it (see ``results_schema.store``). The version is
stored both in the ``schema_version`` column and in the Parquet file metadata
under ``fcsae.schema_version``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from fcsae import config as fcsae_config

SCHEMA_VERSION = "1.6"
"""Version of both tables; bump MINOR for added nullable columns, MAJOR for anything else (see the module docstring)."""
METADATA_KEY = b"fcsae.schema_version"
"""Parquet key-value metadata entry holding the schema version of a file."""
STATUSES = ("ok", "failed", "pruned")
"""``ok``: trained and evaluated; ``failed``: raised, diverged or was killed; ``pruned``: stopped early by the scheduler."""
VERSIONS_FILE = Path(__file__).with_name("versions.json")
"""Frozen column names and types of every schema version (written by ``--freeze``)."""

CONFIG_SECTIONS: dict[str, type] = fcsae_config.SECTIONS
"""Section name -> config dataclass. ``harvest.lm`` is not a column (it is ``lm.*``)."""



class Column(NamedTuple):
    """One column of a result table."""

    name: str
    type: pa.DataType
    doc: str


STR, I64, F64, BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()

CONFIG_FIELDS: list[tuple[str, pa.DataType]] = [
    ("lm.model", STR), ("lm.layer", I64), ("lm.device", STR), ("lm.dtype", STR),
    ("harvest.corpus", STR), ("harvest.tokens", I64), ("harvest.context_len", I64), ("harvest.batch_size", I64),
    ("harvest.shard_tokens", I64), ("harvest.store_dtype", STR),
    ("sae.d_in", I64), ("sae.dict_size", I64), ("sae.activation", STR), ("sae.k", F64),
    ("trainer.lr", F64), ("trainer.batch_size", I64), ("trainer.total_tokens", I64), ("trainer.warmup_steps", I64),
    ("trainer.decay_start", F64), ("trainer.grad_clip", F64), ("trainer.l1_coeff", F64),
    ("trainer.l1_warmup_steps", I64), ("trainer.auxk_coeff", F64), ("trainer.auxk_k", I64),
    ("trainer.dead_tokens", I64), ("trainer.resample_every", I64), ("trainer.resample_until", F64),
    ("trainer.buffer_tokens", I64), ("trainer.seed", I64), ("trainer.log_every", I64),
    ("trainer.checkpoint_every", I64), ("trainer.device", STR), ("trainer.b_dec_init", STR),
    ("tracker.enabled", BOOL), ("tracker.ema_alpha", F64), ("tracker.tau_act", F64), ("tracker.consistency", STR),
    ("tracker.horizon", STR), ("tracker.weighting", STR), ("tracker.stats_every", I64),
    ("split.criterion", STR), ("split.rule", STR), ("split.z", F64), ("split.top_fraction", F64),
    ("split.max_splits", I64), ("split.min_inputs", I64), ("split.kmeans_iters", I64), ("split.operation", STR),
    ("eval.core_tokens", I64), ("eval.absorption_words", I64), ("eval.icl_examples", I64), ("eval.probe_f1_min", F64),
    ("eval.max_k", I64), ("eval.f1_jump", F64), ("eval.seed", I64), ("eval.corpus", STR), ("eval.context_len", I64),
    ("eval.batch_size", I64), ("eval.kl_topk", I64), ("eval.icl_prefixes", I64),
    ("eval.absorption_train_fraction", F64),
    ("sae.matryoshka_groups", STR), ("sae.matryoshka_weights", STR), ("trainer.threshold_decay", F64),
    ("eval.absorption_probe", STR), ("eval.absorption_bootstrap", I64),
    ("trainer.bf16_encoder", STR),
    ("split.sibling_cos", F64),
]
"""Config columns: dotted config field -> pyarrow type. Every scalar field of every config section has one
(``tests/results_schema/test_schema_version.py`` checks it); the column's docstring is the field's own."""


def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings under a dataclass's fields (string literals after each annotated assignment)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def config_columns() -> list[Column]:
    """The ``CONFIG_FIELDS`` columns, each documented by its config field's docstring (KeyError for a field that is gone)."""
    docs = {section: _field_docs(cls) for section, cls in CONFIG_SECTIONS.items()}
    out = []
    for name, pa_type in CONFIG_FIELDS:
        section, field = name.split(".", 1)
        out.append(Column(name, pa_type, docs[section][field]))
    return out


CORE_COLUMNS: list[Column] = [
    Column("core.explained_variance", F64, "Fraction of the input variance the reconstruction explains (1 = perfect)."),
    Column("core.mse", F64, "Mean squared reconstruction error per input dimension, on normalised inputs."),
    Column("core.cossim", F64, "Mean cosine similarity between input and reconstruction."),
    Column("core.l2_ratio", F64, "Mean ratio of reconstruction norm to input norm."),
    Column("core.relative_reconstruction_bias", F64, "||x_hat||^2 / <x, x_hat> summed over tokens (1 = no shrinkage)."),
    Column("core.l0", F64, "Mean number of active latents per token."),
    Column("core.l1", F64, "Mean L1 norm of the latent activations per token."),
    Column("core.frac_dead", F64, "Fraction of latents that never fired on the eval tokens."),
    Column("core.frac_dense", F64, "Fraction of latents that fired on more than the dense threshold of eval tokens."),
    Column("core.n_tokens", F64, "Eval tokens scored (BOS positions excluded)."),
    Column("core.ce_loss_clean", F64, "Next-token cross-entropy of the unmodified model on the eval tokens."),
    Column("core.ce_loss_sae", F64, "Cross-entropy with the SAE reconstruction spliced in at the hook."),
    Column("core.ce_loss_zero_ablation", F64, "Cross-entropy with the hook activations zero-ablated."),
    Column("core.ce_loss_score", F64, "(ce_zero - ce_sae) / (ce_zero - ce_clean): 1 = the SAE loses nothing."),
    Column("core.kl_div_sae", F64, "KL divergence (top-k coarsened) of the spliced model's next-token distribution from the clean one."),
    Column("core.kl_div_zero_ablation", F64, "The same KL with the hook zero-ablated."),
    Column("core.kl_div_zero_ablation_exact", F64, "Exact (full-vocabulary) KL with the hook zero-ablated."),
    Column("core.kl_div_score", F64, "(kl_zero - kl_sae) / kl_zero: 1 = the SAE loses nothing."),
]
"""Core-eval metric columns ``core.<name>`` (null when the core eval did not run)."""

ABSORPTION_COLUMNS: list[Column] = [
    Column("absorption.mean_absorption_fraction", F64, "Mean over scored letters of the fraction of the probe's true positives absorbed by other latents."),
    Column("absorption.mean_full_absorption", F64, "Mean over scored letters of the fraction of true positives where the main latents do not fire at all."),
    Column("absorption.mean_num_split_features", F64, "Mean number of main latents k-sparse probing finds per letter (feature splitting)."),
    Column("absorption.n_letters", F64, "Letters whose probe F1 passed ``eval.probe_f1_min``."),
    Column("absorption.n_letters_scored", F64, "Kept letters with at least one probe true positive (the means are over these)."),
    Column("absorption.probe_f1_mean", F64, "Mean F1 of the 26 letters' linear probes (the model's, not the SAE's)."),
    Column("absorption.mean_absorption_fraction_lo", F64, "Lower end of the 95% bootstrap interval of mean_absorption_fraction (scored words resampled within letters; word sampling only)."),
    Column("absorption.mean_absorption_fraction_hi", F64, "Upper end of that 95% bootstrap interval."),
    Column("absorption.n_scored_words", F64, "Probe true positives scored over the kept letters (the n behind the mean)."),
    Column("absorption.letters_with_latent", I64, "Scored letters whose best single latent reaches k=1 sparse-probe F1 > 0.6."),
    Column("absorption.meaningful", BOOL, "True when >= 20 letters pass the probe and at least half the scored letters have a latent; false: the score says little about this SAE."),
    Column("absorption.probe", STR, "Ground-truth probe convention the eval used: saebench or standardized."),
    Column("absorption.n_words", I64, "Words the absorption eval used (train + test)."),
    Column("absorption.warning", STR, "Why the absorption score is doubtful (e.g. SAEBench would refuse this model/layer); null if none."),
]
"""Absorption-eval summary columns ``absorption.<name>`` (null when the absorption eval did not run)."""


def _numeric(columns: list[Column], prefix: str) -> dict[str, str]:
    return {c.name[len(prefix):]: c.doc for c in columns if pa.types.is_integer(c.type) or pa.types.is_floating(c.type)}


CORE_METRICS: dict[str, str] = _numeric(CORE_COLUMNS, "core.")
"""Numeric core metrics usable as objectives: name (without ``core.``) -> meaning."""
ABSORPTION_METRICS: dict[str, str] = _numeric(ABSORPTION_COLUMNS, "absorption.")
"""Numeric absorption metrics usable as objectives: name (without ``absorption.``) -> meaning."""


_BOOKKEEPING = [
    Column("schema_version", pa.string(), "Version of this schema (``MAJOR.MINOR``) the row was written with."),
    Column("fcsae_version", pa.string(), "Version of the fcsae package that ran the trial."),
    Column("sweep_id", pa.string(), "Unique id of the sweep (fixed when the experiment is created; kept on resume)."),
    Column("sweep_name", pa.string(), "The search space's ``name``."),
    Column("trial_id", pa.string(), "Ray Tune's trial id, unique within the sweep; the row's key."),
    Column("status", pa.string(), "``ok``, ``failed`` or ``pruned``."),
    Column("failure_reason", pa.string(), "One line saying why a trial failed or was pruned; null when ok."),
    Column("searched_params", pa.list_(pa.string()), "Dotted names of the parameters the sweep searched or gridded."),
    Column("objective", pa.float64(), "Value of the first objective (null unless ok)."),
    Column("failure_detail", pa.string(), "The full error text of a failed trial (traceback, or Ray's record of a "
           "dead worker), up to 20,000 characters; ``failure_reason`` is its one-line summary. Null when ok."),
]

_TRAINING = [
    Column("tokens_trained", pa.int64(), "Activation vectors the SAE was trained on."),
    Column("train_seconds", pa.float64(), "Wall time of training in the final attempt (a resumed trial counts only the time after its resume)."),
    Column("eval_seconds", pa.float64(), "Wall time of the core and absorption evals."),
    Column("n_split_events", pa.int64(), "Number of latent operations (split.operation: split or extract events) during training."),
    Column("n_resample_events", pa.int64(), "Number of dead-latent resamplings during training."),
    Column("final_loss", pa.float64(), "Training loss at the last logged step (null if none was logged)."),
    Column("extra_metrics_json", pa.string(), "JSON object of metrics the evals returned that have no column in this schema version."),
]

_ARTEFACTS = [
    Column("trial_dir", pa.string(), "Absolute path of the trial's artefact directory."),
    Column("sae_path", pa.string(), "Absolute path of the saved SAE (safetensors + cfg.json); null if none was saved."),
    Column("events_path", pa.string(), "Absolute path of the split/resample event log (JSON lines); null if none."),
    Column("hostname", pa.string(), "Host the trial ran on."),
    Column("started_at", pa.timestamp("us", tz="UTC"), "When the trial's final attempt started."),
    Column("finished_at", pa.timestamp("us", tz="UTC"), "When the row was written."),
]


def trial_columns() -> list[Column]:
    """All columns of the trial table, in order."""
    return _BOOKKEEPING + config_columns() + CORE_COLUMNS + ABSORPTION_COLUMNS + _TRAINING + _ARTEFACTS


PER_LETTER_COLUMNS: list[Column] = [
    Column("schema_version", pa.string(), "Version of this schema the row was written with."),
    Column("sweep_id", pa.string(), "The sweep's id (as in the trial table)."),
    Column("trial_id", pa.string(), "The trial's id: joins with the trial table."),
    Column("letter", pa.string(), "The first letter (lower case)."),
    Column("probe_f1", pa.float64(), "Test F1 of the letter's linear probe on the model's activations."),
    Column("sparse_f1_k1", pa.float64(), "F1 of a probe on the single best SAE latent."),
    Column("sparse_f1_main", pa.float64(), "F1 of a probe on the letter's main latents."),
    Column("num_split_features", pa.int64(), "Main latents k-sparse probing chose for the letter."),
    Column("main_latents", pa.list_(pa.int64()), "Ids of the main latents."),
    Column("num_probe_true_positives", pa.int64(), "Test words the probe gets right: the words absorption is scored on."),
    Column("mean_absorption_fraction", pa.float64(), "Mean fraction of the probe direction carried by non-main latents."),
    Column("full_absorption_rate", pa.float64(), "Fraction of true positives where no main latent fires."),
    Column("num_full_absorption", pa.int64(), "Number of fully absorbed true positives."),
    Column("latent_share", pa.float64(), "Mean share of a true positive's probe projection that the SAE's latents carry."),
]
"""Columns of the per-letter absorption child table."""


def _schema(columns: list[Column]) -> pa.Schema:
    fields = [pa.field(c.name, c.type, nullable=True, metadata={b"doc": c.doc.encode()}) for c in columns]
    return pa.schema(fields, metadata={METADATA_KEY: SCHEMA_VERSION.encode()})


TRIAL_SCHEMA: pa.Schema = _schema(trial_columns())
"""pyarrow schema of the trial table; each field's metadata ``doc`` is its docstring."""
PER_LETTER_SCHEMA: pa.Schema = _schema(PER_LETTER_COLUMNS)
"""pyarrow schema of the per-letter child table."""


def column_docs(schema: pa.Schema = TRIAL_SCHEMA) -> dict[str, str]:
    """Column name -> docstring for a table schema."""
    return {f.name: (f.metadata or {}).get(b"doc", b"").decode() for f in schema}


def metric_columns() -> list[str]:
    """Names of the metric columns (``core.*``, ``absorption.*``) usable as objectives."""
    return [f"core.{k}" for k in CORE_METRICS] + [f"absorption.{k}" for k in ABSORPTION_METRICS]


def major(version: str) -> int:
    """The major number of a ``MAJOR.MINOR`` version string (ValueError if malformed)."""
    return int(str(version).split(".")[0])


def frozen_form(columns: list[Column]) -> list[list[str]]:
    """``[name, type]`` pairs: what ``versions.json`` stores for one table (docstrings are not part of the contract)."""
    return [[c.name, str(c.type)] for c in columns]


def current_form() -> dict[str, list[list[str]]]:
    """The frozen form of both tables as this code defines them."""
    return {"trial": frozen_form(trial_columns()), "per_letter": frozen_form(PER_LETTER_COLUMNS)}


def load_versions(path: Path = VERSIONS_FILE) -> dict[str, dict]:
    """Version -> frozen form of both tables, from ``versions.json``."""
    return json.loads(path.read_text())


MINOR_WIDENINGS = {("int64", "double")}
"""(old, new) column types a MINOR bump may change: the reader casts old files (``integer_cast="allow-float"``)."""


def version_problems(versions: dict[str, dict], version: str, current: dict) -> list[str]:
    """Why ``current`` (the columns of ``version``) breaks the versioning rules; empty when it does not.

    The current columns must equal the frozen ones of ``version``; within a
    major every later minor must keep every earlier column with its type (it
    may only add); ``version`` must be the newest frozen one.
    """
    problems = []
    frozen = versions.get(version)
    if frozen is None:
        problems.append(f"SCHEMA_VERSION {version} is not frozen in {VERSIONS_FILE.name}: run "
                        "`python -m results_schema.schema --freeze`")
    elif frozen != current:
        for table in ("trial", "per_letter"):
            old, new = dict(map(tuple, frozen.get(table, []))), dict(map(tuple, current[table]))
            changed = sorted(set(old.items()) ^ set(new.items()))
            if changed or list(old) != list(new):
                problems.append(f"{table} columns differ from the frozen SCHEMA_VERSION {version} "
                                f"({', '.join(f'{n}:{t}' for n, t in changed) or 'order'}): bump SCHEMA_VERSION "
                                "(MINOR to add columns, MAJOR otherwise) and run `python -m results_schema.schema --freeze`")
    key = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    ordered = sorted(versions, key=key)
    if ordered and key(version) < key(ordered[-1]):
        problems.append(f"SCHEMA_VERSION {version} is older than the newest frozen version {ordered[-1]}")
    for old_v, new_v in zip(ordered, ordered[1:]):
        if major(old_v) != major(new_v):
            continue
        for table in ("trial", "per_letter"):
            new = dict(map(tuple, versions[new_v][table]))
            lost = [f"{n}:{t}" for n, t in versions[old_v][table] if new.get(n) != t and (t, new.get(n)) not in MINOR_WIDENINGS]
            if lost:
                problems.append(f"{new_v} is a minor bump of {old_v} but changes or drops {table} columns {', '.join(lost)}")
    return problems


def _dump(versions: dict[str, dict]) -> str:
    """``versions.json`` text: one ``[name, type]`` pair per line, so a diff shows each added column."""
    def table(pairs):
        return "[\n" + ",\n".join(f"   {json.dumps(p)}" for p in pairs) + "\n  ]"

    blocks = [f' {json.dumps(v)}: {{\n  "trial": {table(t["trial"])},\n  "per_letter": {table(t["per_letter"])}\n }}'
              for v, t in versions.items()]
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _freeze(path: Path = VERSIONS_FILE) -> int:
    versions = load_versions(path) if path.exists() else {}
    current = current_form()
    if SCHEMA_VERSION in versions and versions[SCHEMA_VERSION] != current:
        print(f"schema: version {SCHEMA_VERSION} is frozen with other columns; bump SCHEMA_VERSION first", file=sys.stderr)
        return 2
    versions[SCHEMA_VERSION] = current
    problems = version_problems(versions, SCHEMA_VERSION, current)
    if problems:
        print("schema: " + "; ".join(problems), file=sys.stderr)
        return 2
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(_dump(versions))
    tmp.replace(path)
    print(f"froze schema {SCHEMA_VERSION} in {path}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m results_schema.schema", description="Freeze the current columns "
                                 "under SCHEMA_VERSION in versions.json (see the module docstring).")
    ap.add_argument("--freeze", action="store_true", required=True, help="write the current version's column list")
    ap.parse_args()
    sys.exit(_freeze())
