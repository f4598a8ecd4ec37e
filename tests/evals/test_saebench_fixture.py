"""fcsae's absorption scoring against SAEBench 0.6.0's own code, on a committed fixture.

``tests/fixtures/saebench_replay.{json,safetensors}`` was produced once by
``benchmarks/saebench_agreement.py --fixture tests/fixtures/saebench_replay``:
a tiny random llama (d_model 32) and its ~440-word tokenizer, fcsae's cached
prompt activations, its SAEBench-convention probe, and a random TopK SAE
(64 latents, k 8) exported in SAELens's format; SAEBench's
``run_k_sparse_probing_experiment`` + ``run_feature_absortion_experiment``
scored them in a throwaway sae-bench venv with fcsae's probe and activations
replayed (the "same probe" comparison). Here fcsae scores the same inputs.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fcsae.config import EvalConfig, SAEConfig
from fcsae.evals import absorption
from fcsae.evals.probe import LETTERS, ProbeData
from fcsae.sae import SparseAutoencoder

FIXTURE = Path(__file__).parent.parent / "fixtures" / "saebench_replay"

pytestmark = pytest.mark.usefixtures("one_thread")


def _load():
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    t = load_file(str(FIXTURE.with_suffix(".safetensors")))
    sae = SparseAutoencoder(SAEConfig(**{k: meta["sae"][k] for k in ("d_in", "dict_size", "k")}))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(t[f"sae.{name}"])
    metrics = [{"letter": c, "f1": 1.0} for c in LETTERS]
    data = ProbeData(t["acts_train"], t["acts_test"], t["labels_train"], t["labels_test"], meta["words_test"],
                     t["probe_W"], t["probe_b"], metrics, tuple(meta["words_train"]))
    return meta, sae, data


def test_fcsae_scores_the_fixture_as_saebench_does():
    meta, sae, data = _load()
    ref = meta["saebench"]
    res = absorption._score_sae(sae, data, meta["norm_scale"], EvalConfig(seed=0), list(range(26)))
    ours = {r["letter"]: r for r in res.per_letter.to_dicts() if r["num_probe_true_positives"] > 0}
    assert set(ours) == set(ref["per_letter"])
    for letter, theirs in ref["per_letter"].items():
        assert ours[letter]["num_probe_true_positives"] == theirs["num_probe_true_positives"], letter
        assert ours[letter]["num_split_features"] == theirs["num_split_feats"], letter
        assert ours[letter]["mean_absorption_fraction"] == pytest.approx(theirs["mean_absorption_fraction"], abs=0.02)
    assert res.summary["mean_absorption_fraction"] == pytest.approx(ref["mean_absorption_fraction"], rel=0.02)
    assert res.summary["mean_full_absorption"] == pytest.approx(ref["mean_full_absorption"], rel=0.02, abs=1e-3)


def test_saelens_encoded_the_fixture_to_fcsaes_codes():
    ref = json.loads(FIXTURE.with_suffix(".json").read_text())["saebench"]
    assert ref["sae_class"] == "TopKSAE" and ref["saelens_same_active_latents"]
    assert ref["saelens_codes_max_abs_diff"] < 1e-4
