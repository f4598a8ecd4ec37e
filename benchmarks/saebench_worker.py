"""SAEBench 0.6.0's absorption eval on one SAELens SAE directory; runs inside the throwaway sae-bench venv.

Started by ``benchmarks/saebench_agreement.py`` (never imports fcsae, whose
transformer-lens 4 conflicts with sae-bench's 3.x). It calls SAEBench's own
functions: ``create_and_train_probe`` (with the given word list instead of
``get_alpha_tokens``, so both sides score the same words),
``run_k_sparse_probing_experiment``, ``run_feature_absortion_experiment``
and ``main._aggregate_results_df``, then averages over letters whose probe
F1 > 0.6 as ``main.run_eval`` does. The model is a small adapter over the
locally prepared HF model (no hub) offering what those functions use of a
HookedTransformer: ``cfg``, ``tokenizer``, ``to_tokens`` and
``run_with_cache`` (BOS prepended, right padding, as TransformerLens does;
the forward stops after the hooked layer, which cannot change it).

Modes: ``e2e`` (SAEBench trains its own probe on its own split and prompts)
and ``replay`` (SAEBench is handed fcsae's probe, split and cached
activations, and ``run_with_cache`` returns fcsae's activation of each
prompt's word: only the scoring code differs). It also checks the SAELens
export: SAELens's ``encode`` of raw activations vs the codes fcsae gave.

Usage: python saebench_worker.py JOB.json  (writes the JSON result to job["out"]).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

TEMPLATE = "{word} has the first letter:"
POS = -6


class _Stop(Exception):
    pass


class HFAdapter:
    """What SAEBench's absorption functions use of a HookedTransformer, over a local HF causal LM."""

    def __init__(self, model_dir: str, name: str, layer: int, replay: dict[str, torch.Tensor] | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.replay = replay
        self.hf = None if replay else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        d_model = next(iter(replay.values())).shape[0] if replay else self.hf.config.hidden_size
        self.layer = layer
        self.cfg = SimpleNamespace(model_name=name, d_model=d_model, device="cpu", default_prepend_bos=True)
        self.bos = self.tokenizer.bos_token_id

    def to_tokens(self, text):
        texts = [text] if isinstance(text, str) else list(text)
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right",
                             return_tensors="pt")
        ids = torch.cat([torch.full((len(texts), 1), self.bos), enc["input_ids"]], 1)
        mask = torch.cat([torch.ones(len(texts), 1, dtype=enc["attention_mask"].dtype), enc["attention_mask"]], 1)
        self._mask = mask
        return ids

    @torch.no_grad()
    def _resid(self, ids, mask):
        out = {}

        def hook(_m, _i, o):
            out["h"] = o[0] if isinstance(o, tuple) else o
            raise _Stop

        h = self.hf.model.layers[self.layer].register_forward_hook(hook)
        try:
            self.hf.model(input_ids=ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            h.remove()
        return out["h"].float()

    def run_with_cache(self, texts, names_filter=None, **_):
        hook = f"blocks.{self.layer}.hook_resid_post"
        ids = self.to_tokens(texts)
        if self.replay is None:
            acts = self._resid(ids, self._mask)
        else:  # fcsae's activation of each prompt's word at the word position, zeros elsewhere
            acts = torch.zeros(ids.shape[0], ids.shape[1], self.cfg.d_model)
            suffix = TEMPLATE.format(word="")
            for i, t in enumerate(texts):
                word = t.split("\n")[-1][: -len(suffix)]
                acts[i, POS] = self.replay[word]
        return None, {hook: acts}


def _write_replay_probe(job, data, probes_dir: Path, name: str, layer: int):
    """fcsae's probe, split and activations in the files SAEBench's ``load_probe*`` read."""
    import pandas as pd
    from sae_bench.evals.absorption.probing import LinearProbe

    d = probes_dir / name / f"layer_{layer}"
    d.mkdir(parents=True, exist_ok=True)
    probe = LinearProbe(data["probe_W"].shape[1], 26)
    with torch.no_grad():
        probe.fc.weight.copy_(data["probe_W"])
        probe.fc.bias.copy_(data["probe_b"])
    torch.save(probe, d / "probe.pth")
    np.savez(d / "data.npz", X_train=data["acts_train"].numpy(), X_test=data["acts_test"].numpy(),
             y_train=data["labels_train"].numpy(), y_test=data["labels_test"].numpy())
    for split in ("train", "test"):
        words = job[f"words_{split}"]
        labels = data[f"labels_{split}"].tolist()
        df = pd.DataFrame({"prompt": [""] * len(words), "HOOK_POINT": [f"blocks.{layer}.hook_resid_post"] * len(words),
                           "answer": [" " + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[y] for y in labels],
                           "answer_class": labels, "token": words})
        df.index.name = "index"
        df.to_csv(d / f"{split}_df.csv", index=True)


def _seed_all(seed: int, stage: str) -> None:
    """Seed python, numpy and torch for one stage of the eval (each stage reproducible on its own)."""
    s = seed + {"probe": 0, "ksp": 1_000_003}[stage]
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _split_seed(words: list[str], seed: int, train_fraction: float = 0.8) -> int:
    """The first of seed, seed + 1000, ... whose SAEBench split has every letter of ``words`` among its train words.

    ``create_dataset_probe_training`` splits ``random.sample(vocab, len(vocab))``
    80/20; ``train_k_sparse_probes`` then fits one probe per letter seen in
    training, and the scoring indexes all 26 (a KeyError when a letter has no
    train word). On the full vocabulary that never happens; on a few thousand
    words a letter with 2 words (z) can miss the train split, so such a seed
    is skipped, with the same draw SAEBench makes replicated here.
    """
    letters = {w.strip()[0].lower() for w in words}
    for s in range(seed, seed + 100_000, 1000):
        random.seed(s)
        train = random.sample(words, len(words))[: int(len(words) * train_fraction)]
        if {w.strip()[0].lower() for w in train} == letters:
            return s
    raise RuntimeError("no seed gives a train split with every letter")


def _covers_letters(probe_done: Path, words: list[str]) -> bool:
    """Whether the saved probe's train split has a word of every letter in ``words``."""
    import pandas as pd

    train_df = pd.read_csv(probe_done.with_name("train_df.csv"), keep_default_na=False)
    return set(train_df["answer_class"]) == {"abcdefghijklmnopqrstuvwxyz".index(w.strip()[0].lower()) for w in words}


def run(job: dict) -> dict:
    from safetensors.torch import load_file
    from sae_lens import SAE
    from sae_bench.evals.absorption import main as sb_main
    from sae_bench.evals.absorption.common import create_and_train_probe
    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    seed, layer, name = job["seed"], job["layer"], job["model_name"]
    _seed_all(seed, "probe")
    torch.set_grad_enabled(True)
    work = Path(tempfile.mkdtemp(prefix="saebench-"))
    os.chdir(work)  # main.py-style artifacts go under the cwd
    probes = Path(job["probes_dir"]) if job.get("probes_dir") else work / "probes"
    ksp, fa = work / "k_sparse_probing", work / "feature_absorption"
    sae = SAE.load_from_disk(job["sae_dir"], device="cpu")
    result: dict = {"mode": job["mode"], "seed": seed, "sae_class": type(sae).__name__}
    data = load_file(job["data"]) if job.get("data") else None
    if data is not None and "codes_check_x" in data:
        with torch.no_grad():
            codes = sae.encode(data["codes_check_x"])
        ref = data["codes_check_z"]
        result["saelens_codes_max_abs_diff"] = float((codes - ref).abs().max())
        result["saelens_codes_rel_diff"] = float((codes - ref).norm() / ref.norm().clamp_min(1e-12))
        result["saelens_same_active_latents"] = bool(((codes > 0) == (ref > 0)).all())
        differ_N = ((codes > 0) != (ref > 0)).any(1)
        result["saelens_tokens_checked"], result["saelens_tokens_differing"] = len(ref), int(differ_N.sum())
        if "codes_check_margin" in data:  # a flipped selection is a tie when fcsae's margin is within fp32 rounding
            at_tie_N = data["codes_check_margin"] <= data["codes_check_tie_tol"]
            result["saelens_differing_at_ties_only"] = bool(at_tie_N[differ_N].all())
    replay = None
    if job["mode"] == "replay":
        from sae_bench.evals.absorption.feature_absorption_calculator import FeatureAbsorptionCalculator

        replay = dict(zip(job["words_test"], data["acts_test"]))
        # replayed activations do not depend on the prompt, so its token length does not matter
        FeatureAbsorptionCalculator._validate_prompts_are_same_length = lambda self, prompts: None
    model = HFAdapter(job["model_dir"], name, layer, replay)
    t0 = time.perf_counter()
    probe_done = probes / name / f"layer_{layer}" / "probe.done"  # written last: a torn probe is retrained
    result["probe_reused"] = job["mode"] == "e2e" and probe_done.is_file() and probe_done.read_text().strip().isdigit() \
        and _covers_letters(probe_done, job["words"])
    if result["probe_reused"]:  # SAEBench trains one probe per model and layer and reuses it for every SAE
        result["split_seed"] = int(probe_done.read_text())
    elif job["mode"] == "e2e":
        result["split_seed"] = _split_seed(job["words"], seed)
        _seed_all(result["split_seed"], "probe")  # right before the call: its first draw is the split
        create_and_train_probe(model=model, formatter=first_letter_formatter(), hook_point=f"blocks.{layer}.hook_resid_post",
                               probes_dir=probes, vocab=job["words"], batch_size=64, num_epochs=50, lr=1e-2,
                               device=torch.device("cpu"), base_template=TEMPLATE, pos_idx=POS)
        if not _covers_letters(probe_done, job["words"]):
            raise RuntimeError(f"SAEBench's split (seed {result['split_seed']}) lacks a letter: the replicated draw differs")
        probe_done.write_text(f"{result['split_seed']}\n")
    else:
        _write_replay_probe(job, data, probes, name, layer)
    result["probe_seconds"] = round(time.perf_counter() - t0, 1)
    _seed_all(seed, "ksp")  # the scores below must not depend on whether the probe was trained or reused
    t0 = time.perf_counter()
    metrics = run_k_sparse_probing_experiment(
        model=model, sae=sae, layer=layer, sae_name="sae", max_k_value=10, prompt_template=TEMPLATE,
        prompt_token_pos=POS, device="cpu", experiment_dir=ksp, probes_dir=probes, force=True, f1_jump_threshold=0.03,
        k_sparse_probe_l1_decay=0.01, k_sparse_probe_batch_size=4096, k_sparse_probe_num_epochs=50,
        precalc_k_sparse_probe_sae_acts=True, eval_batch_size=256, verbose=False)
    kept = set(metrics.loc[metrics["f1_probe"] > job.get("min_probe_f1", 0.6), "letter"])
    result["n_letters"] = len(kept)
    result["probe_f1"] = dict(zip(metrics["letter"], metrics["f1_probe"].astype(float)))
    result["sparse_f1_k1"] = dict(zip(metrics["letter"], metrics["f1_sparse_sae_1"].astype(float)))
    result["refused"] = len(kept) < 20
    result["k_sparse_seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    raw = run_feature_absortion_experiment(
        model=model, sae=sae, layer=layer, sae_name="sae", max_k_value=10, prompt_template=TEMPLATE,
        prompt_token_pos=POS, device="cpu", experiment_dir=fa, sparse_probing_experiment_dir=ksp, probes_dir=probes,
        force=True, feature_split_f1_jump_threshold=0.03, batch_size=64)
    result["absorption_seconds"] = round(time.perf_counter() - t0, 1)
    agg = sb_main._aggregate_results_df(raw)
    agg = agg[agg["letter"].isin(kept)]
    result["mean_absorption_fraction"] = statistics.mean(agg["mean_absorption_fraction"].astype(float))
    result["mean_full_absorption"] = statistics.mean(agg["full_absorption_rate"].astype(float))
    result["mean_num_split_features"] = statistics.mean(agg["num_split_feats"].astype(float))
    result["n_letters_scored"] = int(len(agg))
    result["per_letter"] = {r["letter"]: {"mean_absorption_fraction": float(r["mean_absorption_fraction"]),
                                          "num_probe_true_positives": float(r["num_probe_true_positives"]),
                                          "num_split_feats": int(r["num_split_feats"]),
                                          "split_feats": [int(f) for f in r["split_feats"]]} for _, r in agg.iterrows()}
    return result


if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(job.get("threads", 1)))
    res = run(job)
    tmp = Path(job["out"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, job["out"])
