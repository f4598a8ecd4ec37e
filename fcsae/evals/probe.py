"""First-letter probe data: word list, in-context prompts, model activations and the logistic probe.

Everything here depends only on (model, layer, eval config), so it is computed
once and cached under ``$FCSAE_HOME/evals/absorption`` (see ``store``).

Words follow SAEBench 0.6.0: every single token that is ASCII letters with or
without a leading space (``alpha_vocab``), all of them or a seeded random
sample of ``absorption_words``, shuffled and split 80/20 (``sample_vocab``).
The ground-truth probe is SAEBench's (one 26-output linear layer on raw
activations, ``train_probe_saebench``) or the older standardised sklearn
probes (``train_probe_standardized``), by ``absorption_probe``.

Prompts follow SAEBench: ``"\\n{word} has the first letter: {L}"`` repeated for
``icl_examples`` in-context words, then ``"\\n{word} has the first letter:"``
for the target; the activation is read at the target word's token.

Cost: SAEBench draws fresh examples for every prompt, so 8,000 prompts are
~700k tokens through the model (~7-10 minutes here). Two cuts, neither of
which changes an activation: tokens after the target word are never run (a
causal model's activation at the word cannot depend on them), and the prompts
share ``icl_prefixes`` distinct prefixes per split: each prefix runs once, its
KV cache is copied across the batch, and only ``"\\n"`` + the word run per
prompt, up to the probed layer. Sharing prefixes does change the prompts
(fewer distinct contexts than SAEBench's one per word). A word never appears among its own
prefix's examples. docs/evals.md measures the effect on probe F1 against
fresh per-prompt prefixes (``icl_prefixes=0``, the reference path, which runs
whole prompts through the TransformerLens hook). On the first prefix the
cached path is checked against the hook path; a mismatch falls back to it.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fcsae.config import EvalConfig, LMConfig
from fcsae.errors import FcsaeInputError

log = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = " has the first letter:"
"""What follows the word in every prompt (SAEBench's ``"{word} has the first letter:"``)."""
SEPARATOR = "\n"
KV_CHECK_TOL = 1e-3
"""Largest relative difference allowed between the KV-cached and whole-prompt activations."""


class Vocab(NamedTuple):
    """Sampled words with their token ids, first-letter labels (0-25) and split."""

    words: list[str]
    token_ids: list[int]
    labels: list[int]
    is_train: list[bool]


class ProbeData(NamedTuple):
    """Model activations at the word positions, and the 26 one-vs-rest probes trained on them."""

    acts_train_ND: torch.Tensor
    """Raw residuals of the training words (float32)."""
    acts_test_ND: torch.Tensor
    labels_train_N: torch.Tensor
    labels_test_N: torch.Tensor
    words_test: list[str]
    probe_W_LD: torch.Tensor
    """Probe weights in the raw activation space, one row per letter (zeros for absent letters)."""
    probe_b_L: torch.Tensor
    """Probe biases: score = acts @ W.T + b, positive = predicts that letter."""
    probe_metrics: list[dict[str, Any]]
    """Per letter: ``letter``, ``f1``, ``precision``, ``recall``, ``n_train``, ``n_test`` on the test words."""
    words_train: tuple[str, ...] = ()
    """The training words, in the order of ``acts_train_ND``."""


# ------------------------------------------------------------------ vocabulary


def _token_string(tokenizer, token: str) -> str:
    text = tokenizer.convert_tokens_to_string([token])
    # SentencePiece tokenizers can drop the "▁" word-start marker when converting one token.
    if token.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


ALPHA = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_alpha_word(text: str) -> bool:
    """SAEBench's filter: ASCII letters only, after at most one leading space."""
    body = text[1:] if text.startswith(" ") else text
    return len(body) > 0 and all(c in ALPHA for c in body)


def alpha_vocab(tokenizer) -> list[tuple[str, int]]:
    """(word, token id) of every single token that is ASCII letters with or without a leading space, sorted by id.

    SAEBench 0.6.0's vocabulary (47,078 words on SmolLM2); special tokens are left out.
    """
    special = set(tokenizer.all_special_ids)
    out = []
    for token, tid in tokenizer.get_vocab().items():
        if tid in special:
            continue
        text = _token_string(tokenizer, token)
        if is_alpha_word(text):
            out.append((text, int(tid)))
    return sorted(out, key=lambda wt: wt[1])


def letter_of(word: str) -> int:
    """Class 0-25 of a word's first letter (case and a leading space ignored)."""
    return LETTERS.index(word.strip()[0].lower())


def sample_vocab(tokenizer, eval_cfg: EvalConfig) -> Vocab:
    """The words of the eval and their random train/test split, after SAEBench.

    ``absorption_words`` 0 takes the whole vocabulary; N > 0 a seeded random
    sample of N words. The words are shuffled and the first
    ``int(N * absorption_train_fraction)`` train the probe; the rest are the
    test words that are scored (SAEBench's 80/20 split of its shuffled vocabulary).
    """
    pool = alpha_vocab(tokenizer)
    n = eval_cfg.absorption_words or len(pool)
    if len(pool) < n:
        raise FcsaeInputError(
            f"absorption_words: the tokenizer has only {len(pool)} single-token alphabetic words, fewer than "
            f"absorption_words={eval_cfg.absorption_words}; lower absorption_words (0 = all of them)")
    rng = random.Random(eval_cfg.seed)
    chosen = rng.sample(pool, n)
    n_train = int(n * eval_cfg.absorption_train_fraction)
    words = [w for w, _ in chosen]
    return Vocab(words, [t for _, t in chosen], [letter_of(w) for w in words], [j < n_train for j in range(n)])


# ------------------------------------------------------------------ prompts


class PromptParts(NamedTuple):
    """Token-id pieces every prompt is assembled from."""

    bos: int
    sep: list[int]
    template: list[int]
    answers: list[list[int]]
    """Ids of ``" A"`` .. ``" Z"``."""


def prompt_parts(tokenizer) -> PromptParts:
    """Tokenise the fixed pieces once (the word itself is always its own single token)."""
    from fcsae.corpus import bos_choice

    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return PromptParts(bos_choice(tokenizer).token_id, enc(SEPARATOR), enc(TEMPLATE),
                       [enc(" " + c.upper()) for c in LETTERS])


def prefix_ids(parts: PromptParts, examples: list[tuple[int, int]]) -> list[int]:
    """BOS + ``\\n{word} has the first letter: {L}`` for each (token id, label) example."""
    ids = [parts.bos]
    for tid, label in examples:
        ids += parts.sep + [tid] + parts.template + parts.answers[label]
    return ids


def suffix_ids(parts: PromptParts, tid: int) -> list[int]:
    """The target prompt's tail up to its word: ``\\n{word}`` (the word is the last token).

    The prompt goes on with ``" has the first letter:"``, but in a causal
    model tokens after the word cannot change the activation at the word, so
    they are never run: the activations equal those of the full prompt.
    """
    return parts.sep + [tid]


def _groups(idx: list[int], vocab: Vocab, n_groups: int, n_examples: int, rng: random.Random):
    """Assign the words ``idx`` to prefixes; yields (examples, member word indices).

    Examples are drawn from the same split's words; a word is moved to the
    next prefix when its own token is among the examples.
    """
    pool = [(vocab.token_ids[i], vocab.labels[i]) for i in idx]
    n_groups = max(1, min(n_groups, len(idx))) if n_groups else len(idx)
    examples = [rng.sample(pool, min(n_examples, len(pool))) for _ in range(n_groups)]
    members: list[list[int]] = [[] for _ in range(n_groups)]
    order = idx[:]
    rng.shuffle(order)
    for j, i in enumerate(order):
        g = j % n_groups
        for step in range(n_groups):
            cand = (g + step) % n_groups
            if vocab.token_ids[i] not in {t for t, _ in examples[cand]}:
                g = cand
                break
        members[g].append(i)
    return [(ex, m) for ex, m in zip(examples, members) if m]


# ------------------------------------------------------------------ activations


@contextmanager
def one_thread():
    """Run the block with one torch intra-op thread (for many small ops), restoring the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Stop(Exception):
    """Raised by a forward hook once the probed layer has run: nothing above it is needed."""


def plain_hf_model(lm):
    """A plain transformers model sharing ``lm``'s weights (no copy), for prompts with a reused KV cache.

    The TransformerLens bridge wraps the HF attention modules and, in this
    version, does not fill a HF KV cache (the field notes' garbage-after-one-
    token ``generate``), so the cached path runs an unwrapped twin built on the
    meta device and given the bridge's tensors. Raises ``AttributeError`` when
    the parameter names cannot be matched (the caller then runs whole prompts).
    """
    from transformers import AutoModelForCausalLM

    wrapped = lm.model.original_model
    strip = lambda name: name.replace("._original_component", "")  # noqa: E731
    params = {strip(k): v for k, v in wrapped.state_dict().items()}
    buffers = {strip(k): v for k, v in wrapped.named_buffers()}
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(wrapped.config, dtype=next(wrapped.parameters()).dtype)
    want = plain.state_dict()
    missing = sorted(set(want) - set(params))
    if missing:
        raise AttributeError(f"cannot map the bridge's weights onto a plain model (e.g. {missing[0]})")
    plain.load_state_dict({k: params[k] for k in want}, assign=True)
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            if name not in buffers:
                raise AttributeError(f"cannot map buffer {name}")
            module_name, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(module_name), attr, buffers[name])
    return plain.eval()


def _decoder_layers(hf_model):
    layers = getattr(getattr(hf_model, "base_model", None), "layers", None)
    if layers is None:
        raise AttributeError("no base_model.layers")
    return layers


def _run_to_layer(hf_model, layer: int, input_ids: torch.Tensor, cache) -> torch.Tensor:
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    handle = _decoder_layers(hf_model)[layer].register_forward_hook(hook)
    try:
        hf_model.base_model(input_ids=input_ids, cache=cache, use_cache=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


@torch.no_grad()
def _acts_kv(hf, layer: int, prefix: list[int], suffixes: list[list[int]], word_pos: int, batch: int) -> torch.Tensor:
    """Layer-``layer`` residuals at ``word_pos`` of each suffix, reusing the prefix's KV cache (``hf``: a plain model)."""
    from transformers import DynamicCache

    device = next(hf.parameters()).device
    # Many small ops on 2-token batches: one intra-op thread avoids OpenMP sync costs, which dominate when
    # the machine is shared (one 100-word prefix group of SmolLM2: 4.6 s with 1 thread, 33 s with 2, at load ~14).
    with one_thread():
        cache = DynamicCache(config=hf.config)
        _run_to_layer(hf, layer, torch.tensor([prefix], device=device), cache)
        out = []
        for i in range(0, len(suffixes), batch):
            chunk = suffixes[i:i + batch]
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(len(chunk))
            h = _run_to_layer(hf, layer, torch.tensor(chunk, device=device), c)
            out.append(h[:, word_pos].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def _acts_full(lm, layer: int, prompts: list[list[int]], word_pos: int, batch: int) -> torch.Tensor:
    """Layer-``layer`` residuals at ``word_pos`` (from the end) of whole prompts, via the TransformerLens hook."""
    from fcsae.lm import resid_at

    out = []
    for i in range(0, len(prompts), batch):
        toks = torch.tensor(prompts[i:i + batch])
        out.append(resid_at(lm, toks, layer)[:, word_pos].float().cpu())
    return torch.cat(out)


def collect_acts(lm, lm_cfg: LMConfig, eval_cfg: EvalConfig, vocab: Vocab, train: bool,
                 progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Residuals ``[N, D]`` at the word position for one split, and the word indices in that order."""
    parts = prompt_parts(lm.tokenizer)
    rng = random.Random(f"{eval_cfg.seed}-{'train' if train else 'test'}")
    idx = [i for i, t in enumerate(vocab.is_train) if t == train]
    groups = _groups(idx, vocab, eval_cfg.icl_prefixes, eval_cfg.icl_examples, rng)
    word_pos = len(parts.sep)
    suffix_len = len(parts.sep) + 1
    name = "train" if train else "test"
    if eval_cfg.icl_prefixes > 0:
        acts, order = [], []
        try:
            hf = plain_hf_model(lm)
            for g, (examples, members) in enumerate(tqdm(groups, desc=f"absorption prompts ({name})",
                                                         disable=not progress)):
                prefix = prefix_ids(parts, examples)
                suffixes = [suffix_ids(parts, vocab.token_ids[i]) for i in members]
                a = _acts_kv(hf, lm_cfg.layer, prefix, suffixes, word_pos, eval_cfg.batch_size * 32)
                if g == 0:
                    ref = _acts_full(lm, lm_cfg.layer, [prefix + s for s in suffixes[:2]], word_pos - suffix_len, 2)
                    rel = float((a[:2] - ref).norm() / ref.norm().clamp_min(1e-12))
                    log.info("absorption: KV-cached vs whole-prompt activations, relative difference %.2e", rel)
                    if rel > KV_CHECK_TOL:
                        raise ValueError(f"relative difference {rel:.2e} > {KV_CHECK_TOL}")
                acts.append(a)
                order += members
            return torch.cat(acts), order
        except (AttributeError, ValueError, TypeError, RuntimeError) as e:
            log.warning("absorption: KV-cached prompts unusable for this model (%s); running whole prompts", e)
    # Whole prompts through the hook; equal lengths are batched together (no padding).
    prompts: dict[int, list[tuple[list[int], int]]] = {}
    for examples, members in groups:
        prefix = prefix_ids(parts, examples)
        for i in members:
            p = prefix + suffix_ids(parts, vocab.token_ids[i])
            prompts.setdefault(len(p), []).append((p, i))
    acts, order = [], []
    batch = max(1, eval_cfg.batch_size * 2)
    items = [pi for length in sorted(prompts) for pi in prompts[length]]
    with tqdm(total=len(items), desc=f"absorption prompts ({name})", disable=not progress) as bar:
        for length in sorted(prompts):
            same = prompts[length]
            for j in range(0, len(same), batch):
                chunk = same[j:j + batch]
                acts.append(_acts_full(lm, lm_cfg.layer, [p for p, _ in chunk], word_pos - suffix_len, batch))
                order += [i for _, i in chunk]
                bar.update(len(chunk))
    return torch.cat(acts), order


# ------------------------------------------------------------------ probe


SAEBENCH_PROBE = {"epochs": 50, "lr": 1e-2, "end_lr": 1e-5, "weight_decay": 1e-4, "batch": 64}
"""SAEBench 0.6.0's ground-truth probe training (``train_and_save_probes`` -> ``train_linear_probe_for_task``)."""


def letter_metrics(scores_NL: np.ndarray, y_train_N: np.ndarray, y_test_N: np.ndarray) -> list[dict[str, Any]]:
    """Per letter: test F1/precision/recall of ``score > 0`` and the train/test word counts."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    rows = []
    for letter in range(len(LETTERS)):
        truth, pred = y_test_N == letter, scores_NL[:, letter] > 0
        rows.append({"letter": LETTERS[letter], "n_train": int((y_train_N == letter).sum()), "n_test": int(truth.sum()),
                     "f1": float(f1_score(truth, pred, zero_division=0)),
                     "precision": float(precision_score(truth, pred, zero_division=0)),
                     "recall": float(recall_score(truth, pred, zero_division=0))})
    return rows


def train_probe_saebench(x_train_ND: np.ndarray, y_train_N: np.ndarray, x_test_ND: np.ndarray, y_test_N: np.ndarray,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """SAEBench's probe: one linear layer with 26 outputs on the raw activations, trained as one-vs-rest.

    BCE with logits and ``pos_weight`` = negatives/positives per letter, Adam
    (lr 1e-2 decaying exponentially to 1e-5 over 50 epochs, weight decay
    1e-4), batches of 64 shuffled words, ``nn.Linear``'s default init; all
    seeded. The raw (uncentred) activations matter: the probe direction then
    carries part of the residual mean, which every absorption rule projects on.
    A letter without training words gets weight 1 (SAEBench would divide by 0).
    """
    hp = SAEBENCH_PROBE
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(x_train_ND, dtype=torch.float32)
    y = F.one_hot(torch.as_tensor(y_train_N).long(), len(LETTERS)).float()
    pos = y.sum(0)
    pos_weight = torch.where(pos > 0, (len(y) - pos) / pos.clamp_min(1), torch.ones_like(pos))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(x.shape[1], len(LETTERS))
    opt = torch.optim.Adam(probe.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    gamma = math.exp(math.log(hp["end_lr"] / hp["lr"]) / hp["epochs"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with one_thread(), torch.enable_grad():
        for _ in range(hp["epochs"]):
            for rows in torch.randperm(len(x), generator=gen).split(hp["batch"]):
                opt.zero_grad()
                loss_fn(probe(x[rows]), y[rows]).backward()
                opt.step()
            sched.step()
    W = probe.weight.detach().double().numpy()
    b = probe.bias.detach().double().numpy()
    return W, b, letter_metrics(x_test_ND @ W.T + b, y_train_N, y_test_N)


def train_probe(x_train_ND: np.ndarray, y_train_N: np.ndarray, x_test_ND: np.ndarray, y_test_N: np.ndarray,
                seed: int = 0, convention: str = "saebench") -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The ground-truth probe of ``convention`` (``EvalConfig.absorption_probe``): weights [26, D], biases [26], metrics."""
    fit = train_probe_saebench if convention == "saebench" else train_probe_standardized
    return fit(x_train_ND, y_train_N, x_test_ND, y_test_N, seed=seed)


def train_probe_standardized(x_train_ND: np.ndarray, y_train_N: np.ndarray, x_test_ND: np.ndarray,
                             y_test_N: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """26 one-vs-rest logistic probes (sklearn, standardised inputs, balanced classes).

    Returns weights ``[26, D]`` and biases ``[26]`` mapped back to the raw
    input space (score = x @ W.T + b) and per-letter test metrics.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(x_train_ND)
    xs = scaler.transform(x_train_ND)
    D = x_train_ND.shape[1]
    W, b = np.zeros((len(LETTERS), D)), np.zeros(len(LETTERS))
    for letter in range(len(LETTERS)):
        y = (y_train_N == letter).astype(np.int64)
        if 0 < y.sum() < len(y):
            # small problems: extra BLAS threads only add contention on a shared machine
            with threadpool_limits(limits=1, user_api="blas"):
                clf = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed).fit(xs, y)
            W[letter] = clf.coef_[0] / scaler.scale_
            b[letter] = clf.intercept_[0] - float((clf.coef_[0] * scaler.mean_ / scaler.scale_).sum())
        else:
            b[letter] = -1.0  # no probe for this letter: predicts nothing
    return W, b, letter_metrics(x_test_ND @ W.T + b, y_train_N, y_test_N)
