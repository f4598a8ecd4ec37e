"""The result table's contract: ``SCHEMA_VERSION``, the pyarrow schemas, a docstring per column.

One row per trial (``TRIAL_SCHEMA``) and one row per (trial, letter) of the
first-letter absorption eval (``PER_LETTER_SCHEMA``, the child table, joined on
``trial_id``). Column names:

- bookkeeping columns (``sweep_id``, ``trial_id``, ``status`` ...);
- every field of every trial config, by its dotted name (``split.criterion``,
  ``tracker.ema_alpha``, ``sae.dict_size``, ``trainer.seed`` ...), so a row
  says exactly what was trained whether or not the field was searched; the
  docstring of such a column is the config field's own docstring;
- metrics as ``core.<name>`` and ``absorption.<name>`` (float64, null when an
  eval did not run or the trial failed).

Versioning: ``MAJOR.MINOR``. A minor bump only adds nullable columns, so readers
accept any minor of a major they know; a new major means a changed meaning or
type, and readers refuse it (see ``results_schema.store``). The version is
stored both in the ``schema_version`` column and in the Parquet file metadata
under ``fcsae.schema_version``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import NamedTuple

import pyarrow as pa

from fcsae import config as fcsae_config

SCHEMA_VERSION = "1.0"
"""Version of both tables; bump MINOR for added nullable columns, MAJOR for anything else."""
METADATA_KEY = b"fcsae.schema_version"
"""Parquet key-value metadata entry holding the schema version of a file."""
STATUSES = ("ok", "failed", "pruned")
"""``ok``: trained and evaluated; ``failed``: raised, diverged or was killed; ``pruned``: stopped early by the scheduler."""

# Config sections as they appear in searched parameter names and result columns.
CONFIG_SECTIONS: dict[str, type] = fcsae_config.SECTIONS
"""Section name -> config dataclass. ``harvest.lm`` is not a column (it is ``lm.*``)."""

CORE_METRICS: dict[str, str] = {
    "explained_variance": "Fraction of the input variance the reconstruction explains (1 = perfect).",
    "mse": "Mean squared reconstruction error per input dimension, on normalised inputs.",
    "cossim": "Mean cosine similarity between input and reconstruction.",
    "l2_ratio": "Mean ratio of reconstruction norm to input norm.",
    "relative_reconstruction_bias": "||x_hat||^2 / <x, x_hat> summed over tokens (1 = no shrinkage).",
    "l0": "Mean number of active latents per token.",
    "l1": "Mean L1 norm of the latent activations per token.",
    "frac_dead": "Fraction of latents that never fired on the eval tokens.",
    "frac_dense": "Fraction of latents that fired on more than the dense threshold of eval tokens.",
    "n_tokens": "Eval tokens scored (BOS positions excluded).",
    "ce_loss_clean": "Next-token cross-entropy of the unmodified model on the eval tokens.",
    "ce_loss_sae": "Cross-entropy with the SAE reconstruction spliced in at the hook.",
    "ce_loss_zero_ablation": "Cross-entropy with the hook activations zero-ablated.",
    "ce_loss_score": "(ce_zero - ce_sae) / (ce_zero - ce_clean): 1 = the SAE loses nothing.",
    "kl_div_sae": "KL divergence (top-k coarsened) of the spliced model's next-token distribution from the clean one.",
    "kl_div_zero_ablation": "The same KL with the hook zero-ablated.",
    "kl_div_zero_ablation_exact": "Exact (full-vocabulary) KL with the hook zero-ablated.",
    "kl_div_score": "(kl_zero - kl_sae) / kl_zero: 1 = the SAE loses nothing.",
}
"""Core metrics: name -> meaning. Columns ``core.<name>``."""

ABSORPTION_METRICS: dict[str, str] = {
    "mean_absorption_fraction": "Mean over scored letters of the fraction of the probe's true positives absorbed by other latents.",
    "mean_full_absorption": "Mean over scored letters of the fraction of true positives where the main latents do not fire at all.",
    "mean_num_split_features": "Mean number of main latents k-sparse probing finds per letter (feature splitting).",
    "n_letters": "Letters whose probe F1 passed ``eval.probe_f1_min``.",
    "n_letters_scored": "Kept letters with at least one probe true positive (the means are over these).",
    "probe_f1_mean": "Mean F1 of the 26 letters' linear probes (the model's, not the SAE's).",
}
"""Absorption summary metrics: name -> meaning. Columns ``absorption.<name>``."""


class Column(NamedTuple):
    """One column of a result table."""

    name: str
    type: pa.DataType
    doc: str


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


_PA_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}


def config_columns() -> list[Column]:
    """A column per scalar field of every config section, named ``section.field``, documented by the field's docstring."""
    columns = []
    for section, cls in CONFIG_SECTIONS.items():
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            if ftype not in _PA_TYPES:
                continue  # nested configs (harvest.lm) have their own section
            columns.append(Column(f"{section}.{f.name}", _PA_TYPES[ftype], docs.get(f.name, "")))
    return columns


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
]

_TRAINING = [
    Column("tokens_trained", pa.int64(), "Activation vectors the SAE was trained on."),
    Column("train_seconds", pa.float64(), "Wall time of training in the final attempt (a resumed trial counts only the time after its resume)."),
    Column("eval_seconds", pa.float64(), "Wall time of the core and absorption evals."),
    Column("n_split_events", pa.int64(), "Number of latent splits during training."),
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
    metrics = [Column(f"core.{k}", pa.float64(), v) for k, v in CORE_METRICS.items()]
    metrics += [Column(f"absorption.{k}", pa.float64(), v) for k, v in ABSORPTION_METRICS.items()]
    return _BOOKKEEPING + config_columns() + metrics + _TRAINING + _ARTEFACTS


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
