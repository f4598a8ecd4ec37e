"""First-letter probe per residual layer: which (model, layer) can carry the absorption eval?

For each single-token word (a leading space + ASCII letters), build the prompt

    <bos>[\\n {ex} has the first letter: {EX}] x icl  \\n {word}

with ``icl`` random in-context examples shared by a group of words (the
prefix runs once into a KV cache; the target's own " has the first letter:"
is not run: it comes after the word and cannot change the word's residual in
a causal model), read the residual stream at the word's token from every
candidate layer in one forward pass (stopping at the deepest), and train a standardised multinomial logistic probe per layer to
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
    """Prompt groups that share an in-context prefix, and the probe target of each word."""

    groups: list[tuple[list[int], list[int]]]  # (prefix ids, indices into words) per group
    suffixes: list[list[int]]  # per word: "\n" + the word's token
    letters: np.ndarray  # [N] ints 0..25
    words: list[str]


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


def build_prompts(tokenizer, words: dict[str, int], n_words: int, icl: int, group: int, seed: int) -> Prompts:
    """Sample ``n_words`` target words; each group of ``group`` words shares one random ``icl``-example prefix."""
    rng = np.random.default_rng(seed)
    vocab = sorted(words)
    chosen = [vocab[i] for i in rng.choice(len(vocab), size=min(n_words, len(vocab)), replace=False)]
    nl, suffix = _ids(tokenizer, "\n"), _ids(tokenizer, SUFFIX)
    letter_ids = {c: _ids(tokenizer, " " + c.upper()) for c in "abcdefghijklmnopqrstuvwxyz"}
    groups = []
    for start in range(0, len(chosen), group):
        prefix = [tokenizer.bos_token_id]
        for ex in rng.choice(len(vocab), size=icl, replace=False):
            e = vocab[ex]
            prefix += nl + [words[e]] + suffix + letter_ids[e[1].lower()]
        groups.append((prefix, list(range(start, min(start + group, len(chosen))))))
    # The target's own " has the first letter:" comes after the word and, the model
    # being causal, cannot change the residual at the word: it is not run.
    suffixes = [nl + [words[w]] for w in chosen]
    letters = np.array([ord(w[1].lower()) - ord("a") for w in chosen])
    return Prompts(groups, suffixes, letters, chosen)


class _Stop(Exception):
    """Raised once the deepest wanted layer has run: nothing above it is needed."""


def _run_layers(hf, ids_BT: torch.Tensor, cache, layers: list[int]) -> dict[int, torch.Tensor]:
    """Run the plain HF model on ``ids_BT`` after ``cache``; decoder-layer outputs (= hook_resid_post) for ``layers``."""
    got, handles = {}, []
    blocks = hf.base_model.layers
    for layer in layers:
        def hook(_m, _i, out, layer=layer):
            got[layer] = out[0] if isinstance(out, tuple) else out
            if layer == layers[-1]:
                raise _Stop
        handles.append(blocks[layer].register_forward_hook(hook))
    try:
        hf.base_model(input_ids=ids_BT, cache=cache, use_cache=True)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


@torch.no_grad()
def collect(lm: L.LoadedModel, prompts: Prompts, layers: list[int]) -> dict[int, np.ndarray]:
    """Residuals at the word token for every layer.

    Each group's prefix runs once (batch 1) into a KV cache that is repeated
    for the group's words, so a word costs 2 tokens, not the whole prompt; the
    pass stops at the deepest layer. The first group is checked against whole
    prompts through the TransformerLens hook (``lm.resids_at``).
    """
    from transformers import DynamicCache

    hf = L.hf_model_copy(lm)
    feats = {layer: np.zeros((len(prompts.words), lm.d_model), np.float32) for layer in layers}
    for g, (prefix, members) in enumerate(tqdm(prompts.groups, desc=f"{lm.name} prompt groups")):
        cache = DynamicCache(config=hf.config)
        _run_layers(hf, torch.tensor([prefix]), cache, layers)
        cache.batch_repeat_interleave(len(members))
        out = _run_layers(hf, torch.tensor([prompts.suffixes[i] for i in members]), cache, layers)
        for layer in layers:
            feats[layer][members] = out[layer][:, -1].float().numpy()
        if g == 0:
            whole = torch.tensor([prefix + prompts.suffixes[i] for i in members[:4]])
            ref = L.resids_at(lm, whole, layers)
            for layer in layers:
                a, b = torch.from_numpy(feats[layer][members[:4]]), ref[layer][:, -1].float()
                rel = float((a - b).norm() / b.norm())
                log.info("L%d: KV-cached vs whole-prompt hook activations, relative difference %.1e", layer, rel)
                assert rel < 1e-3, f"KV-cached activations disagree with the hook at layer {layer}: {rel:.1e}"
    return feats


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
    p.add_argument("--icl", type=int, default=10, help="in-context examples per prompt")
    p.add_argument("--group", type=int, default=64, help="words sharing one in-context prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time", action="store_true", help="also time a bare forward pass up to each layer (needs a quiet machine)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    layers = sorted(int(x) for x in args.layers.split(","))

    t0 = time.perf_counter()
    lm = L.load_model(args.model)
    words = single_token_words(lm.tokenizer)
    prompts = build_prompts(lm.tokenizer, words, args.words, args.icl, args.group, args.seed)
    prefix0, members0 = prompts.groups[0]
    n_tok = len(prompts.groups) * len(prefix0) + 2 * len(prompts.words)
    log.info("%d single-token words in the vocabulary, %d prompts, %d groups, %d tokens run", len(words), len(prompts.words),
             len(prompts.groups), n_tok)
    log.info("first prompt: %r", lm.tokenizer.decode(prefix0 + prompts.suffixes[members0[0]]))
    t1 = time.perf_counter()
    feats = collect(lm, prompts, layers)
    t_collect = time.perf_counter() - t1
    log.info("collected %d layers in %.0f s", len(layers), t_collect)
    speed = time_forward(lm, layers) if args.time else {}
    results = {}
    for layer in layers:
        t2 = time.perf_counter()
        results[layer] = probe(feats[layer], prompts.letters, args.seed) | {
            "blocks_frac": round((layer + 1) / lm.n_layers, 3), "fwd_tok_s": round(speed[layer], 1) if speed else None}
        r = results[layer]
        log.info("L%d: macro F1 %.3f, pass %d/%d (probe %.0f s)", layer, r["macro_f1"], r["n_pass"], r["n_eligible"],
                 time.perf_counter() - t2)
    summary = {"model": args.model, "n_layers": lm.n_layers, "vocab_words": len(words), "n_words": len(prompts.words),
               "icl": args.icl, "group": args.group, "prompt_len": len(prefix0) + 2 + len(_ids(lm.tokenizer, SUFFIX)), "seed": args.seed,
               "collect_s": round(t_collect, 1), "total_s": round(time.perf_counter() - t0, 1),
               "layers": {str(k): v for k, v in results.items()}}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"| {args.model} layer | macro F1 | letters F1>0.6 | blocks run per token | fwd tok/s to layer |")
    print("|---|---|---|---|---|")
    for layer, r in results.items():
        tok_s = f"{r['fwd_tok_s']:.0f}" if r["fwd_tok_s"] else "-"
        print(f"| L{layer} | {r['macro_f1']:.2f} | {r['n_pass']}/{r['n_eligible']} | {layer + 1}/{lm.n_layers} | {tok_s} |")


if __name__ == "__main__":
    main()
