"""First-letter probe per residual layer: which (model, layer) can carry the absorption eval?

For each single-token word (a leading space + ASCII letters), build the prompt

    <bos>[\\n {ex} has the first letter: {EX}] x icl  \\n {word}

with ``icl`` random in-context examples (the target's own " has the first
letter:" is not run: it comes after the word and cannot change the word's
residual in a causal model), read the residual stream at the
word's token from every candidate layer in one forward pass (stopping at the
deepest), and train a standardised multinomial logistic probe per layer to
predict the word's first letter. A letter passes when its test F1 > 0.6
(SAEBench's cut); only letters with >= 5 test words count. Also times a bare
forward pass up to each candidate layer (what harvesting costs per token).

Usage: nice python scripts/probe_layers.py --model smollm2-135m --layers 2,4,8 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from fcsae import lm as L

log = logging.getLogger("probe_layers")
WORD_RE = re.compile(r"^ [A-Za-z]{2,}$")
SUFFIX = " has the first letter:"


class Prompts(NamedTuple):
    """Token ids of all prompts (same length) and the probe target of each."""

    tokens_NT: torch.Tensor
    letters: np.ndarray  # [N] ints 0..25
    words: list[str]
    word_pos: int  # position of the target word's token


def single_token_words(tokenizer) -> dict[str, int]:
    """Vocabulary entries that decode to a leading space + >= 2 ASCII letters: word -> token id."""
    out = {}
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid])
        if WORD_RE.match(text) and text not in out:
            out[text] = tid
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompts(tokenizer, words: dict[str, int], n_words: int, icl: int, seed: int) -> Prompts:
    """Sample ``n_words`` target words and build equal-length prompts with ``icl`` random examples each."""
    rng = np.random.default_rng(seed)
    vocab = sorted(words)
    chosen = [vocab[i] for i in rng.choice(len(vocab), size=min(n_words, len(vocab)), replace=False)]
    nl, suffix = _ids(tokenizer, "\n"), _ids(tokenizer, SUFFIX)
    letter_ids = {c: _ids(tokenizer, " " + c.upper()) for c in "abcdefghijklmnopqrstuvwxyz"}
    # Equal lengths (no padding) need every piece to be a fixed number of tokens.
    assert all(len(v) == 1 for v in letter_ids.values()), "letter answers must be single tokens"
    bos = [tokenizer.bos_token_id]
    rows, letters = [], []
    for w in chosen:
        row = list(bos)
        for ex in rng.choice(len(vocab), size=icl, replace=False):
            e = vocab[ex]
            row += nl + [words[e]] + suffix + letter_ids[e[1].lower()]
        # The target's own suffix (" has the first letter:") comes after the word and,
        # the model being causal, cannot change the residual at the word: leave it out.
        row += nl + [words[w]]
        rows.append(row)
        letters.append(ord(w[1].lower()) - ord("a"))
    word_pos = len(rows[0]) - 1
    return Prompts(torch.tensor(rows), np.array(letters), chosen, word_pos)


def collect(lm: L.LoadedModel, prompts: Prompts, layers: list[int], batch: int) -> dict[int, np.ndarray]:
    """Residuals at the word token for every layer, one forward per batch stopping at the deepest layer."""
    feats = {layer: [] for layer in layers}
    n = len(prompts.tokens_NT)
    for start in tqdm(range(0, n, batch), desc=f"{lm.name} prompts", unit="batch"):
        res = L.resids_at(lm, prompts.tokens_NT[start:start + batch], layers)
        for layer in layers:
            feats[layer].append(res[layer][:, prompts.word_pos].float().numpy())
    return {layer: np.concatenate(v) for layer, v in feats.items()}


def probe(X: np.ndarray, y: np.ndarray, seed: int, min_test: int = 5, f1_min: float = 0.6) -> dict:
    """Standardised multinomial logistic probe; per-letter test F1, macro F1 and pass count."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(y, minlength=26)
    keep = counts[y] >= 2  # stratified split needs two of each class
    Xtr, Xte, ytr, yte = train_test_split(X[keep], y[keep], test_size=0.2, random_state=seed, stratify=y[keep])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.1))
    clf.fit(Xtr, ytr)
    pred = clf.predict(Xte)
    f1 = f1_score(yte, pred, labels=np.arange(26), average=None, zero_division=0)
    eligible = [i for i in range(26) if (yte == i).sum() >= min_test]
    passed = [i for i in eligible if f1[i] > f1_min]
    return {
        "macro_f1": float(np.mean(f1[eligible])) if eligible else 0.0,
        "n_pass": len(passed),
        "n_eligible": len(eligible),
        "accuracy": float((pred == yte).mean()),
        "f1_per_letter": {chr(97 + i): round(float(f1[i]), 4) for i in eligible},
    }


def time_forward(lm: L.LoadedModel, layers: list[int], batch: int = 4, ctx: int = 128, reps: int = 2) -> dict[int, float]:
    """Tokens/s of a bare forward pass up to each layer (random tokens, fixed shape), best of ``reps``."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, len(lm.tokenizer), (batch, ctx), generator=g)
    L.resid_at(lm, toks[:1, :16], layers[0])  # warm-up
    out = {}
    for layer in layers:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            L.resid_at(lm, toks, layer)
            best = min(best, time.perf_counter() - t0)
        out[layer] = batch * ctx / best
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--layers", required=True, help="comma-separated layer indices")
    p.add_argument("--words", type=int, default=8000)
    p.add_argument("--icl", type=int, default=2, help="in-context examples per prompt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    layers = sorted(int(x) for x in args.layers.split(","))

    t0 = time.perf_counter()
    lm = L.load_model(args.model)
    words = single_token_words(lm.tokenizer)
    prompts = build_prompts(lm.tokenizer, words, args.words, args.icl, args.seed)
    log.info("%d single-token words in the vocabulary, %d prompts of %d tokens", len(words), len(prompts.words), prompts.tokens_NT.shape[1])
    log.info("first prompt: %r", lm.tokenizer.decode(prompts.tokens_NT[0]))
    t1 = time.perf_counter()
    feats = collect(lm, prompts, layers, args.batch)
    t_collect = time.perf_counter() - t1
    log.info("collected %d layers in %.0f s (%.0f prompt tok/s)", len(layers), t_collect, prompts.tokens_NT.numel() / t_collect)
    speed = time_forward(lm, layers)
    results = {}
    for layer in layers:
        t2 = time.perf_counter()
        results[layer] = probe(feats[layer], prompts.letters, args.seed) | {"fwd_tok_s": round(speed[layer], 1)}
        r = results[layer]
        log.info("L%d: macro F1 %.3f, pass %d/%d, fwd %.0f tok/s (probe %.0f s)", layer, r["macro_f1"], r["n_pass"], r["n_eligible"],
                 speed[layer], time.perf_counter() - t2)
    summary = {"model": args.model, "n_layers": lm.n_layers, "vocab_words": len(words), "n_words": len(prompts.words),
               "icl": args.icl, "prompt_len": int(prompts.tokens_NT.shape[1]), "seed": args.seed,
               "collect_s": round(t_collect, 1), "total_s": round(time.perf_counter() - t0, 1),
               "layers": {str(k): v for k, v in results.items()}}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| {args.model} layer | macro F1 | letters F1>0.6 | fwd tok/s to layer |")
    print("|---|---|---|---|")
    for layer, r in results.items():
        print(f"| L{layer} | {r['macro_f1']:.2f} | {r['n_pass']}/{r['n_eligible']} | {r['fwd_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
