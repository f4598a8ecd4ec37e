"""Typed, frozen configuration for one trial.

Every field has a docstring (the string literal under it) and is checked in
``__post_init__``: a value of the wrong type (``seed='0'``, ``lr='1e-4'``) or
out of range raises ``FcsaeInputError`` naming the field and what is allowed.
YAML lives only at the edge (search spaces, ``fcsae train --config``);
``from_dict`` turns a plain mapping into one class and refuses unknown keys,
``section_configs`` assembles every section of a trial (the one assembly the
sweep and its trials use).

Each class belongs to one module: ``LMConfig``/``HarvestConfig`` to
lm/corpus/activations, ``SAEConfig`` to sae, ``TrainerConfig`` to trainer and
resample, ``TrackerConfig``/``SplitConfig`` to tracker and split,
``EvalConfig`` to evals.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from fcsae import policy
from fcsae.errors import FcsaeInputError, require

# Chosen from the first-letter probe table in docs/default-model.md.
DEFAULT_MODEL = "smollm2-135m"
"""Short name of the offline default model (see ``fcsae.lm``)."""
DEFAULT_LAYER = 8
"""Residual-stream layer hooked by default (``blocks.{layer}.hook_resid_post``)."""


@dataclass(frozen=True)
class LMConfig:
    """Which language model and hook point activations come from."""

    model: str = DEFAULT_MODEL
    """Short offline name (``smollm2-135m``, ``gemma3-270m``), any TransformerLens/HF name, or a local directory."""
    layer: int = DEFAULT_LAYER
    """Residual stream after this block: ``blocks.{layer}.hook_resid_post``."""
    device: str = "cpu"
    """Torch device for the language model (``cpu``, ``cuda``, ``cuda:1``)."""
    dtype: str = "float32"
    """Dtype the language model runs in: ``float32``, ``bfloat16`` or ``float16``."""

    def __post_init__(self):
        _check_types(self)
        require(bool(self.model), "model: must be a non-empty name or path")
        require(isinstance(self.layer, int) and self.layer >= 0, f"layer: must be an integer >= 0, got {self.layer!r}")
        require(self.dtype in ("float32", "bfloat16", "float16"), f"dtype: must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass(frozen=True)
class HarvestConfig:
    """What to harvest into the on-disk activation cache."""

    lm: LMConfig = field(default_factory=LMConfig)
    """Model and layer."""
    corpus: str = "offline"
    """``offline`` (the packaged default corpus), a local text/parquet/json file, or a ``datasets`` hub name."""
    tokens: int = 200_000
    """Number of activation vectors (tokens, BOS positions excluded) to store."""
    context_len: int = 128
    """Tokens per packed context, BOS included."""
    batch_size: int = 8
    """Contexts per forward pass."""
    shard_tokens: int = 65_536
    """Activation vectors per shard file; an interrupted harvest resumes at a shard boundary."""
    store_dtype: str = "float16"
    """On-disk dtype of activations: ``float16`` or ``bfloat16``."""

    def __post_init__(self):
        _check_types(self)
        require(isinstance(self.tokens, int) and self.tokens > 0, f"tokens: must be a positive integer, got {self.tokens!r}")
        require(self.context_len >= 2, f"context_len: must be >= 2, got {self.context_len!r}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size!r}")
        require(self.shard_tokens >= 1, f"shard_tokens: must be >= 1, got {self.shard_tokens!r}")
        require(self.store_dtype in ("float16", "bfloat16"), f"store_dtype: must be float16 or bfloat16, got {self.store_dtype!r}")


ACTIVATIONS = ("topk", "relu", "batchtopk", "matryoshka")
BATCH_ACTIVATIONS = ("batchtopk", "matryoshka")
"""Activations that keep the top ``k x batch`` pre-activations of the whole batch (inference: one threshold)."""
SPARSE_ACTIVATIONS = ("topk", *BATCH_ACTIVATIONS)
"""Activations with a fixed sparsity ``k`` (unit-norm decoder rows, AuxK for dead latents)."""
MATRYOSHKA_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32)
"""Default group fractions of a Matryoshka SAE (the SAEBench suite's: 1/32, 1/16, 1/8, 1/4, rest)."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_list(text, where: str) -> tuple[float, ...]:
    """``"a,b,c"`` (or a list) of numbers, each an int, a decimal or ``p/q``."""
    items = [str(v).strip() for v in text] if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", item)
        try:
            out.append(int(m[1]) / int(m[2]) if m else (int(item) if re.fullmatch(r"\s*\d+\s*", item) else float(item)))
        except (ValueError, ZeroDivisionError):
            raise FcsaeInputError(f"{where}: {item!r} is not a number; give comma-separated numbers, e.g. '1/32,1/16,1/8,1/4,17/32'") from None
    return tuple(out)


def _canonical(values) -> str:
    return ",".join(repr(v) for v in values)


@dataclass(frozen=True)
class SAEConfig:
    """Shape and activation function of one sparse autoencoder."""

    d_in: int
    """Width of the input activations (the model's d_model)."""
    dict_size: int = 4096
    """Number of latents."""
    activation: str = "topk"
    """``topk`` (k largest pre-activations per token, then ReLU), ``batchtopk`` (the ``k x batch`` largest of the whole
    batch; at inference one threshold, the training EMA of the smallest kept activation), ``matryoshka`` (BatchTopK
    trained with nested-prefix reconstruction losses, see ``matryoshka_groups``) or ``relu`` (trained with an L1 penalty)."""
    k: float = 32
    """Active latents per token: exact for ``topk`` (an integer), the batch average for ``batchtopk``/``matryoshka``
    (may be fractional); ignored for ``relu``."""
    matryoshka_groups: str = ""
    """``matryoshka`` only: the nested prefixes, comma-separated, as integer prefix widths (strictly increasing, the
    last = ``dict_size``, e.g. ``128,512,4096``) or as group fractions summing to 1 (e.g. ``1/4,3/4``); empty = the
    SAEBench fractions 1/32, 1/16, 1/8, 1/4, rest."""
    matryoshka_weights: str = ""
    """``matryoshka`` only: comma-separated positive weight per prefix in the loss (normalised to sum 1); empty = equal."""

    def __post_init__(self):
        for name in ("matryoshka_groups", "matryoshka_weights"):  # a YAML list is accepted and stored as its string
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, _canonical(_parse_list(value, name)))
        _check_types(self)
        require(isinstance(self.d_in, int) and self.d_in >= 1, f"d_in: must be an integer >= 1, got {self.d_in!r}")
        require(isinstance(self.dict_size, int) and self.dict_size >= 1, f"dict_size: must be an integer >= 1, got {self.dict_size!r}")
        require(self.activation in ACTIVATIONS, f"activation: must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.activation == "topk":
            require(_is_number(self.k) and float(self.k).is_integer(),
                    f"k: topk keeps a whole number of latents per token; got {self.k!r} (fractional k needs activation batchtopk or matryoshka)")
            object.__setattr__(self, "k", int(self.k))
        if self.activation in SPARSE_ACTIVATIONS:
            require(_is_number(self.k) and 1 <= self.k <= self.dict_size,
                    f"k: must be a number in [1, dict_size={self.dict_size}], got {self.k!r}")
        if self.activation == "matryoshka":
            widths = self.matryoshka_widths
            require(widths[0] >= 1, f"matryoshka_groups: the first prefix is empty at dict_size={self.dict_size}; use fewer or larger groups")
            weights = self.matryoshka_level_weights
            require(len(weights) == len(widths),
                    f"matryoshka_weights: needs one weight per prefix ({len(widths)}), got {len(weights)}")

    @property
    def matryoshka_widths(self) -> tuple[int, ...]:
        """Nested prefix widths (strictly increasing, the last = ``dict_size``) from ``matryoshka_groups``."""
        values = _parse_list(self.matryoshka_groups, "matryoshka_groups") if self.matryoshka_groups.strip() else MATRYOSHKA_FRACTIONS
        if all(isinstance(v, int) for v in values):
            require(all(a < b for a, b in zip(values, values[1:])),
                    f"matryoshka_groups: prefix widths must be strictly increasing, got {self.matryoshka_groups!r}")
            require(values[-1] == self.dict_size,
                    f"matryoshka_groups: the last prefix width must be dict_size={self.dict_size}, got {values[-1]}")
            require(values[0] >= 1, f"matryoshka_groups: prefix widths must be >= 1, got {values[0]}")
            return tuple(values)
        require(all(0 < v <= 1 for v in values), f"matryoshka_groups: fractions must be in (0, 1], got {self.matryoshka_groups!r}")
        require(abs(sum(values) - 1) < 1e-6, f"matryoshka_groups: group fractions must sum to 1, got {sum(values):.6g}")
        sizes = [int(v * self.dict_size) for v in values[:-1]]
        sizes.append(self.dict_size - sum(sizes))
        require(all(s >= 1 for s in sizes),
                f"matryoshka_groups: a group is empty at dict_size={self.dict_size} ({self.matryoshka_groups or 'default'}); use fewer groups")
        widths, total = [], 0
        for s in sizes:
            total += s
            widths.append(total)
        return tuple(widths)

    @property
    def matryoshka_level_weights(self) -> tuple[float, ...]:
        """Loss weight per prefix, summing to 1 (equal unless ``matryoshka_weights`` says otherwise)."""
        if not self.matryoshka_weights.strip():
            n = len(self.matryoshka_widths)
            return (1.0 / n,) * n
        w = _parse_list(self.matryoshka_weights, "matryoshka_weights")
        require(all(v > 0 for v in w), f"matryoshka_weights: weights must be > 0, got {self.matryoshka_weights!r}")
        return tuple(v / sum(w) for v in w)


B_DEC_INITS = ("geometric_median", "mean", "zeros")


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation, schedule, dead-latent handling and checkpoint cadence."""

    lr: float = 4e-4
    """Adam learning rate after warm-up."""
    batch_size: int = 4096
    """Activation vectors per step."""
    total_tokens: int = 2_000_000
    """Training budget in activation vectors; steps = total_tokens // batch_size."""
    warmup_steps: int = 100
    """Linear LR warm-up from 0."""
    decay_start: float = 0.8
    """Fraction of training after which the LR decays linearly to 0."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    l1_coeff: float = 5.0
    """L1 coefficient for ``relu`` SAEs (penalty on activation x decoder-row norm)."""
    l1_warmup_steps: int = 200
    """Linear warm-up of the L1 coefficient for ``relu`` SAEs."""
    auxk_coeff: float = 1 / 32
    """AuxK loss coefficient for ``topk`` SAEs (the TopK paper's default); 0 disables."""
    auxk_k: int = 256
    """Dead latents used by the AuxK loss."""
    threshold_decay: float = 0.99
    """batchtopk/matryoshka: EMA decay per step of the inference threshold (the smallest kept activation); SAELens's
    0.99 follows about the last 100 steps, so short runs whose activations still shrink need less (0.9)."""
    dead_tokens: int = 1_000_000
    """A latent is dead after this many tokens without firing."""
    resample_every: int = 0
    """Steps between resampling/splitting events (0: never)."""
    resample_until: float = 0.7
    """No resampling/splitting after this fraction of training (lets the SAE settle)."""
    buffer_tokens: int = 16_384
    """Recent inputs kept for resampling and splitting."""
    seed: int = 0
    """Seed for initialisation, data order and resampling."""
    log_every: int = 50
    """Steps between metric callbacks."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    device: str = "cpu"
    """Torch device for the SAE."""
    b_dec_init: str = "geometric_median"
    """Decoder-bias initialisation from the first batch: ``geometric_median``, ``mean`` or ``zeros`` (keep as is)."""

    bf16_encoder: str = "auto"
    """Rank latents by bfloat16 encoder pre-activations; the kept values, losses and gradients stay fp32.
    ``auto``: on where bf16 is faster (CUDA with bf16, CPUs with AMX-BF16/AVX512-BF16,
    ``fcsae.sae.bf16_encoder_pays``); ``on``; ``off``."""

    def __post_init__(self):
        require(self.bf16_encoder in ("auto", "on", "off"),
                f"bf16_encoder: must be one of auto, on, off, got {self.bf16_encoder!r}")
        _check_types(self)
        require(self.b_dec_init in B_DEC_INITS, f"b_dec_init: must be one of {', '.join(B_DEC_INITS)}, got {self.b_dec_init!r}")
        require(self.buffer_tokens >= 0, f"buffer_tokens: must be >= 0, got {self.buffer_tokens!r}")
        require(self.auxk_k >= 1, f"auxk_k: must be >= 1, got {self.auxk_k!r}")
        require(self.l1_warmup_steps >= 0, f"l1_warmup_steps: must be >= 0, got {self.l1_warmup_steps!r}")
        require(self.checkpoint_every >= 0, f"checkpoint_every: must be >= 0, got {self.checkpoint_every!r}")
        require(self.lr > 0, f"lr: must be > 0, got {self.lr!r}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size!r}")
        require(self.total_tokens >= 1, f"total_tokens: must be >= 1, got {self.total_tokens!r}")
        require(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps!r}")
        require(0.0 <= self.decay_start <= 1.0, f"decay_start: must be in [0, 1], got {self.decay_start!r}")
        require(self.grad_clip >= 0, f"grad_clip: must be >= 0, got {self.grad_clip!r}")
        require(self.l1_coeff >= 0, f"l1_coeff: must be >= 0, got {self.l1_coeff!r}")
        require(self.auxk_coeff >= 0, f"auxk_coeff: must be >= 0, got {self.auxk_coeff!r}")
        require(0.0 <= self.threshold_decay < 1.0, f"threshold_decay: must be in [0, 1), got {self.threshold_decay!r}")
        require(self.dead_tokens >= 1, f"dead_tokens: must be >= 1, got {self.dead_tokens!r}")
        require(self.resample_every >= 0, f"resample_every: must be >= 0, got {self.resample_every!r}")
        require(0.0 <= self.resample_until <= 1.0, f"resample_until: must be in [0, 1], got {self.resample_until!r}")
        require(self.log_every >= 1, f"log_every: must be >= 1, got {self.log_every!r}")

    @property
    def total_steps(self) -> int:
        """Number of optimiser steps."""
        return max(1, self.total_tokens // self.batch_size)

    def checkpoints_at(self, step: int) -> bool:
        """Whether the trainer checkpoints after ``step`` (every ``checkpoint_every`` steps and at the end).

        The one definition of the cadence: the trainer and the sweep's
        trials (which attach a Tune checkpoint to that step's report) ask here.
        """
        return step >= self.total_steps or (self.checkpoint_every > 0 and step % self.checkpoint_every == 0)

    def resumable(self, checkpoints: int = 10) -> "TrainerConfig":
        """This config, checkpointing about ``checkpoints`` times per run when ``checkpoint_every`` is 0.

        Used by sweep trials so that an interrupted trial continues instead of
        restarting. The interval is a multiple of ``log_every``, so every
        checkpoint step also has that step's metrics.
        """
        if self.checkpoint_every:
            return self
        every = max(1, self.total_steps // checkpoints // self.log_every) * self.log_every
        return dataclasses.replace(self, checkpoint_every=every)


CONSISTENCY = ("normalized", "seed")
HORIZONS = ("ema", "all")
WEIGHTINGS = ("count", "activation")


@dataclass(frozen=True)
class TrackerConfig:
    """Frequency-consistency tracker (see docs/design.md, "The method")."""

    enabled: bool = False
    """Update the tracker every step (always on when the split criterion needs it)."""
    ema_alpha: float = 0.99
    """EMA decay of the per-latent firing frequency, in (0, 1)."""
    tau_act: float = 0.0
    """A latent counts as active on a token when |a_i| > tau_act."""
    consistency: str = "normalized"
    """``normalized`` (||mu||^2 / E||x||^2, scale-free) or ``seed`` (1 / (1 + tr(Sigma)/d_in))."""
    horizon: str = "ema"
    """Horizon of the per-latent input statistics: ``ema`` (sums decay by ``ema_alpha`` each step, so they follow the
    latent as it trains) or ``all`` (whole history since the last reset)."""
    weighting: str = "count"
    """How each activating input counts in the latent's statistics: ``count`` (once) or ``activation`` (by its activation value)."""
    stats_every: int = 1
    """Add a batch to the per-latent input sums every this many updates (the frequency is updated every step);
    1 = exact. Larger values trade statistical noise for speed (see docs/method.md for the measured effect)."""

    def __post_init__(self):
        _check_types(self)
        require(isinstance(self.ema_alpha, (int, float)) and 0.0 < self.ema_alpha < 1.0,
                f"ema_alpha: must be in (0, 1), got {self.ema_alpha!r}")
        require(isinstance(self.tau_act, (int, float)) and self.tau_act >= 0.0, f"tau_act: must be >= 0, got {self.tau_act!r}")
        require(self.consistency in CONSISTENCY, f"consistency: must be one of {', '.join(CONSISTENCY)}, got {self.consistency!r}")
        require(self.horizon in HORIZONS, f"horizon: must be one of {', '.join(HORIZONS)}, got {self.horizon!r}")
        require(self.weighting in WEIGHTINGS, f"weighting: must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        require(isinstance(self.stats_every, int) and self.stats_every >= 1,
                f"stats_every: must be an integer >= 1, got {self.stats_every!r}")


CRITERIA = tuple(policy.CRITERIA)
"""Names of the split criteria (the table and its meaning live in ``fcsae.policy``)."""
OPERATIONS = tuple(policy.OPERATIONS)
"""Names of the operations applied to score-selected latents (``fcsae.policy.OPERATIONS``)."""
RULES = ("zscore", "top_fraction")


@dataclass(frozen=True)
class SplitConfig:
    """Which latents are split (or resampled) at each resampling event."""

    criterion: str = "none"
    """``none``, ``dead`` (classic dead-latent resampling), ``fc`` (f*(1-c)), ``frequency`` (f), ``inconsistency`` (1-c),
    or a detector of ``fcsae.detectors``: ``siblings``, ``encdec``, ``coact``, ``coact_member`` (the table: ``fcsae.policy``)."""
    rule: str = "zscore"
    """``zscore`` (score > mean + z*std) or ``top_fraction`` (the top fraction of scores)."""
    z: float = 3.0
    """Threshold in standard deviations for ``zscore``."""
    top_fraction: float = 0.01
    """Fraction of latents selected by ``top_fraction``."""
    max_splits: int = 64
    """At most this many splits per event."""
    min_inputs: int = 16
    """Latents with fewer activating inputs in the buffer are not split."""
    kmeans_iters: int = 10
    """Lloyd iterations of the 2-means that divides a split latent's activating inputs."""
    operation: str = "split"
    """What a latent selected by a scored criterion (``fc``, ``frequency``, ``inconsistency`` or a detector) undergoes:
    ``split`` (2-means of its activating inputs, the latent and a recycled one take a centroid each) or ``extract``
    (the latent and its decoder siblings give their shared component to their parent latent or the recycled one, see
    ``fcsae.extract``); see ``fcsae.policy``."""
    sibling_cos: float = 0.25
    """Decoder cosine from which two latents share a component: the ``extract`` groups and the ``siblings``/``coact``
    detectors."""

    def __post_init__(self):
        _check_types(self)
        require(self.criterion in policy.CRITERIA,
                f"criterion: must be one of {', '.join(policy.CRITERIA)}, got {self.criterion!r}")
        require(self.rule in RULES, f"rule: must be one of {', '.join(RULES)}, got {self.rule!r}")
        require(0.0 < self.top_fraction <= 1.0, f"top_fraction: must be in (0, 1], got {self.top_fraction!r}")
        require(self.max_splits >= 1, f"max_splits: must be >= 1, got {self.max_splits!r}")
        require(self.min_inputs >= 2, f"min_inputs: must be >= 2, got {self.min_inputs!r}")
        require(isinstance(self.kmeans_iters, int) and self.kmeans_iters >= 1,
                f"kmeans_iters: must be an integer >= 1, got {self.kmeans_iters!r}")
        require(self.operation in policy.OPERATIONS,
                f"operation: must be one of {', '.join(policy.OPERATIONS)}, got {self.operation!r}")
        require(0.0 < self.sibling_cos < 1.0, f"sibling_cos: must be in (0, 1), got {self.sibling_cos!r}")


ABSORPTION_PROBES = ("saebench", "standardized")
"""Ground-truth probe conventions of the absorption eval (see ``EvalConfig.absorption_probe``)."""


@dataclass(frozen=True)
class EvalConfig:
    """Budgets of the core and absorption evals."""

    core_tokens: int = 16_384
    """Held-out tokens for the core metrics (with the SAE spliced into the model)."""
    absorption_words: int = 0
    """Word budget of the first-letter eval: 0 = SAEBench's full vocabulary (every alphabetic single token, with or
    without a leading space); N > 0 = a seeded random sample of N of them (sweeps lower it for speed)."""
    absorption_probe: str = "saebench"
    """Ground-truth letter probe: ``saebench`` (one 26-output linear layer on raw activations, BCE + pos_weight,
    Adam, as SAEBench 0.6.0) or ``standardized`` (26 sklearn logistic regressions on standardised activations)."""
    absorption_bootstrap: int = 1000
    """Bootstrap resamples of the scored words for the interval of the mean absorption fraction (0 = none)."""
    icl_examples: int = 10
    """In-context examples per absorption prompt."""
    probe_f1_min: float = 0.6
    """Letters whose probe F1 is below this are dropped."""
    max_k: int = 10
    """Largest k in k-sparse probing."""
    f1_jump: float = 0.03
    """F1 gain that makes an extra latent a feature split."""
    seed: int = 0
    """Seed for word sampling and probe training."""
    corpus: str = "offline"
    """Text source of the core eval's held-out tokens (as ``HarvestConfig.corpus``); its ``test`` split is used."""
    context_len: int = 128
    """Tokens per packed eval context, BOS included (use the harvest's ``context_len``)."""
    batch_size: int = 8
    """Contexts (core) per forward pass; absorption prompts per pass are ``batch_size * 32``."""
    kl_topk: int = 64
    """Clean next-token log-probs cached per position for the KL score (top k + a rest bucket); 0 = exact KL, recomputing clean logits per trial."""
    icl_prefixes: int = 32
    """Distinct in-context prefixes shared by the absorption prompts (each run once, its KV cache reused); 0 = a fresh prefix per prompt as in SAEBench (about 12x slower)."""
    absorption_train_fraction: float = 0.8
    """Fraction of the absorption words used to train the probes; the rest is the test split that is scored."""

    def __post_init__(self):
        _check_types(self)
        require(self.core_tokens >= 1, f"core_tokens: must be >= 1, got {self.core_tokens!r}")
        require(bool(self.corpus), "corpus: must be 'offline', a local file or a datasets hub name")
        require(isinstance(self.context_len, int) and self.context_len >= 2, f"context_len: must be an integer >= 2, got {self.context_len!r}")
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size: must be an integer >= 1, got {self.batch_size!r}")
        require(isinstance(self.kl_topk, int) and self.kl_topk >= 0, f"kl_topk: must be an integer >= 0, got {self.kl_topk!r}")
        require(isinstance(self.icl_prefixes, int) and self.icl_prefixes >= 0, f"icl_prefixes: must be an integer >= 0, got {self.icl_prefixes!r}")
        require(0.0 < self.absorption_train_fraction < 1.0, f"absorption_train_fraction: must be in (0, 1), got {self.absorption_train_fraction!r}")
        require(self.f1_jump >= 0, f"f1_jump: must be >= 0, got {self.f1_jump!r}")
        require(isinstance(self.absorption_words, int) and (self.absorption_words == 0 or self.absorption_words >= 26),
                f"absorption_words: must be 0 (the full vocabulary) or an integer >= 26, got {self.absorption_words!r}")
        require(self.absorption_probe in ABSORPTION_PROBES,
                f"absorption_probe: must be one of {', '.join(ABSORPTION_PROBES)}, got {self.absorption_probe!r}")
        require(isinstance(self.absorption_bootstrap, int) and self.absorption_bootstrap >= 0,
                f"absorption_bootstrap: must be an integer >= 0, got {self.absorption_bootstrap!r}")
        require(self.icl_examples >= 0, f"icl_examples: must be >= 0, got {self.icl_examples!r}")
        require(0.0 <= self.probe_f1_min <= 1.0, f"probe_f1_min: must be in [0, 1], got {self.probe_f1_min!r}")
        require(self.max_k >= 1, f"max_k: must be >= 1, got {self.max_k!r}")


T = TypeVar("T")

SECTIONS: dict[str, type] = {
    "lm": LMConfig,
    "harvest": HarvestConfig,
    "sae": SAEConfig,
    "trainer": TrainerConfig,
    "tracker": TrackerConfig,
    "split": SplitConfig,
    "eval": EvalConfig,
}
"""Section name -> config class, as in search spaces (``fixed.trainer``), dotted parameters and result columns.
``harvest.lm`` is the ``lm`` section; ``sae.d_in`` comes from the activation cache."""

_TYPE_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
}


def type_problem(cls: type, name: str, value: Any) -> str | None:
    """``"name: must be <type>, got <value>"`` if ``value`` has the wrong type for field ``name`` of ``cls``, else None.

    Scalar fields only (int, float, str, bool; an int is a valid float, a bool
    is no number); nested configs and unknown names pass (``from_dict`` refuses
    unknown keys).
    """
    ftype = {f.name: f.type for f in dataclasses.fields(cls)}.get(name)
    check = _TYPE_CHECKS.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
    if check is not None and ftype == "int" and check[0](value) and not -2**63 <= value < 2**63:
        return f"{name}: must fit in a 64-bit integer (results store it as int64), got {value!r}"
    if check is None or check[0](value):
        return None
    hint = ""
    if isinstance(value, str) and ftype == "float":
        hint = " (a string: quoted, or YAML's reading of 1e-4 without a dot; write 1.0e-4, unquoted)"
    elif isinstance(value, str) and ftype == "int":
        hint = " (a string: remove the quotes)"
    return f"{name}: must be {check[1]}, got {value!r}{hint}"


def _check_types(obj: Any) -> None:
    """Raise ``FcsaeInputError`` for the first field of dataclass ``obj`` whose value has the wrong type."""
    for f in dataclasses.fields(obj):
        msg = type_problem(type(obj), f.name, getattr(obj, f.name))
        if msg:
            raise FcsaeInputError(msg)


def field_type_problem(section: str, field: str, value: Any) -> str | None:
    """``type_problem`` for the dotted field ``section.field`` (message prefixed with ``section.``)."""
    msg = type_problem(SECTIONS[section], field, value)
    return f"{section}.{msg}" if msg else None


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types with a clear error.

    Nested dataclass fields accept nested mappings. ``where`` prefixes field
    names in error messages (e.g. ``trainer.``).
    """
    if not isinstance(data, Mapping):
        raise FcsaeInputError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise FcsaeInputError(f"{where}{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        ftype = fields[name].type
        sub = _dataclass_by_name.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if sub is not None and isinstance(value, Mapping):
            value = from_dict(sub, value, f"{where}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except FcsaeInputError as e:
        raise FcsaeInputError(f"{where}{e}") from None
    except TypeError as e:
        raise FcsaeInputError(f"{where or cls.__name__}: {e}") from None


def section_configs(fixed: Mapping[str, Mapping], overrides: Mapping[str, Any] | None = None,
                    d_in: int = 1) -> dict[str, Any]:
    """Every section's config from plain ``fixed`` sections plus dotted ``overrides``; raises FcsaeInputError.

    ``fixed`` maps section names (``SECTIONS``) to field mappings, e.g.
    ``{"trainer": {"lr": 1e-3}}``; ``overrides`` maps dotted names to values
    (``{"split.criterion": "fc"}``) and wins over ``fixed``. ``harvest.lm`` is
    the ``lm`` section; ``sae.d_in`` is ``d_in`` (known once the cache exists).
    Returns section name -> config instance, for every section.
    """
    sections = {s: dict(fixed.get(s) or {}) for s in SECTIONS}
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not name:
            raise FcsaeInputError(f"{dotted}: not a dotted config field; sections: {', '.join(SECTIONS)}")
        sections[section][name] = value
    sections["sae"]["d_in"] = d_in
    out = {}
    for section, cls in SECTIONS.items():
        data = sections[section]
        if section == "harvest":
            data = {**data, "lm": sections["lm"]}
        out[section] = from_dict(cls, data, f"{section}.")
    return out


_dataclass_by_name = {c.__name__: c for c in SECTIONS.values()}
