"""Absorption eval: hand-built absorption cases, split features, the prompt/probe cache, determinism, bad input."""

import math

import pytest
import torch

from fcsae.config import EvalConfig, LMConfig
from fcsae.errors import FcsaeInputError
from fcsae.evals import absorption, probe, store
from fcsae.evals.absorption import absorption_scores, split_features
from fcsae.evals.probe import LETTERS, ProbeData
from tests._evals_utils import DenseSAE, identity_sae


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the per-word rule, by hand


def _e(i, d=4):
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def test_absorption_scores_match_hand_computed_cases():
    # probe = e0. Latent 0: main (decoder e0). Latent 1: absorber, decoder (0.8, 0.6) -> cos 0.8.
    # Latent 2: orthogonal. Latent 3: cos 0.05 (too small to absorb, enough for "full"). Latent 4: orthogonal.
    W_dec = torch.stack([_e(0), torch.tensor([0.8, 0.6, 0, 0]), _e(1),
                         torch.tensor([0.05, math.sqrt(1 - 0.05 ** 2), 0, 0]), _e(2)])
    lat = torch.tensor([
        [2.0, 0, 0, 0, 0],    # main carries the whole projection (2 >= 2): fraction 0, not full
        [0, 2.5, 0, 0, 0],    # main silent, absorber projects 2.0 = 100%: fraction 1, full
        [1.0, 1.25, 0, 0, 0],  # main 1, absorber 1 (50% >= 40%): fraction 1/(1+1) = 0.5, main fires: not full
        [0.5, 0.5, 0, 0, 0],  # absorber 0.4 = 20% < 40%: fraction 0
        [0, 0, 0, 40.0, 0],   # only a cos-0.05 latent (projection 2): no absorber (cos < 0.1) but full absorption
    ])
    x = torch.tensor([[2.0, 0, 0, 0], [2.0, 1.5, 0, 0], [2.0, 0.75, 0, 0], [2.0, 0.3, 0, 0], [2.0, 39.9, 0, 0]])
    res = absorption_scores(lat, x, probe_D=3 * _e(0), W_dec_FD=W_dec, main_ids=[0])
    assert res.fraction_N.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.0, 0.0])
    assert res.full_N.tolist() == [False, True, False, False, True]


def test_absorption_is_zero_for_words_with_negative_projection():
    W_dec = torch.stack([_e(0), torch.tensor([0.8, 0.6, 0, 0])])
    res = absorption_scores(torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 0, 0, 0]]), _e(0), W_dec, [0])
    assert res.fraction_N.tolist() == [0.0] and res.full_N.tolist() == [False]


def test_split_features_follow_the_f1_jumps():
    feats = [[5], [5, 7], [5, 7, 1], [5, 7, 1, 2]]
    assert split_features([0.5, 0.6, 0.61, 0.95], feats, 0.03) == [5, 7]  # 0.61 < 0.6 + 0.03 stops the walk
    assert split_features([0.5, 0.52, 0.9], feats, 0.03) == [5]
    assert split_features([0.2, 0.3, 0.4, 0.5], feats, 0.03) == [5, 7, 1, 2]


# ------------------------------------------------------------------ a constructed eval with a known answer


def _planted():
    """26 letters on dims 0..25 (raw activations 6 e_L; norm_scale 0.5 -> SAE input 3 e_L).

    Two test words of letter a also carry a token direction (dims 26, 27), each with its own latent
    whose decoder is (e0 + e_26/27)/sqrt2 and whose firing switches latent 0 off: absorbed words. The
    token latents never fire on training words, so k-sparse probing cannot make them main latents.
    Expected: letter a absorption fraction 2/4, full absorption 2/4; every other letter 0; one main latent each.
    """
    D = 32
    tr_x, tr_y, te_x, te_y = [], [], [], []
    for letter in range(26):
        for _ in range(8):
            tr_x.append(6 * torch.eye(D)[letter])
            tr_y.append(letter)
        for j in range(4):
            v = 6 * torch.eye(D)[letter]
            if letter == 0 and j < 2:
                v = v + 6 * torch.eye(D)[26 + j]
            te_x.append(v)
            te_y.append(letter)
    W_enc = torch.eye(D)
    W_enc[26, 0] = W_enc[27, 0] = -1.0  # latent 0 = relu(x0 - x26 - x27)
    W_dec = torch.eye(D)
    W_dec[26] = (torch.eye(D)[0] + torch.eye(D)[26]) / math.sqrt(2)
    W_dec[27] = (torch.eye(D)[0] + torch.eye(D)[27]) / math.sqrt(2)
    sae = DenseSAE(W_enc, W_dec, relu=True)
    metrics = [{"letter": c, "f1": 1.0, "precision": 1.0, "recall": 1.0, "n_train": 8, "n_test": 4} for c in LETTERS]
    W_probe = torch.zeros(26, D)
    W_probe[:, :26] = torch.eye(26)
    data = ProbeData(torch.stack(tr_x), torch.stack(te_x), torch.tensor(tr_y), torch.tensor(te_y),
                     [f" w{i}" for i in range(len(te_y))], W_probe, torch.full((26,), -3.0), metrics)
    return sae, data


@pytest.fixture(scope="module")
def tiny_lm():
    from fcsae.lm import make_tiny_model

    return make_tiny_model("llama", d_model=32, n_layers=2)


def test_planted_absorption_gives_the_hand_computed_numbers(tiny_lm, monkeypatch):
    sae, data = _planted()
    monkeypatch.setattr(absorption, "prepare_absorption_cache", lambda *a, **k: data)
    res = absorption.evaluate_absorption(sae, LMConfig(model="tiny", layer=0), EvalConfig(), 0.5, lm=tiny_lm,
                                         progress=False)
    table = {r["letter"]: r for r in res.per_letter.to_dicts()}
    assert table["a"]["num_probe_true_positives"] == 4
    assert table["a"]["mean_absorption_fraction"] == pytest.approx(0.5)
    assert table["a"]["full_absorption_rate"] == pytest.approx(0.5)
    assert table["a"]["main_latents"] == [0]
    for c in LETTERS[1:]:
        assert table[c]["mean_absorption_fraction"] == 0.0 and table[c]["full_absorption_rate"] == 0.0
        assert table[c]["main_latents"] == [LETTERS.index(c)]
    assert res.summary["n_letters"] == 26
    assert res.summary["mean_absorption_fraction"] == pytest.approx(0.5 / 26)
    assert res.summary["mean_full_absorption"] == pytest.approx(0.5 / 26)
    assert res.summary["mean_num_split_features"] == pytest.approx(1.0)


def test_letters_below_the_probe_threshold_are_dropped(tiny_lm, monkeypatch):
    sae, data = _planted()
    metrics = [dict(m, f1=0.5) if m["letter"] in "abc" else m for m in data.probe_metrics]
    monkeypatch.setattr(absorption, "prepare_absorption_cache", lambda *a, **k: data._replace(probe_metrics=metrics))
    res = absorption.evaluate_absorption(sae, LMConfig(model="tiny", layer=0), EvalConfig(), 0.5, lm=tiny_lm,
                                         progress=False)
    assert res.summary["n_letters"] == 23
    assert "a" not in res.per_letter["letter"].to_list()
    assert res.summary["mean_absorption_fraction"] == 0.0


# ------------------------------------------------------------------ vocabulary, prompts, cache


def test_stratified_sampling_keeps_rare_letters_and_splits_per_letter(tiny_lm):
    pool = probe.alpha_vocab(tiny_lm.tokenizer)
    assert all(w.startswith(" ") and w[1:].isalpha() for w, _ in pool)
    assert all(tiny_lm.tokenizer(w, add_special_tokens=False)["input_ids"] == [t] for w, t in pool)
    v = probe.sample_vocab(tiny_lm.tokenizer, EvalConfig(absorption_words=100, seed=3))
    assert len(v.words) == 100 and len(set(v.words)) == 100
    letters = {LETTERS.index(w[1].lower()) for w, _ in pool}
    assert set(v.labels) == letters  # every letter the tokenizer has is sampled
    assert probe._quotas([3, 100, 100], 60) == [3, 29, 28]
    assert sum(probe._quotas([50, 400, 7], 300)) == 300


def test_too_few_alphabetic_tokens_is_a_clear_error(tiny_lm):
    with pytest.raises(FcsaeInputError, match="only .* single-token words"):
        probe.sample_vocab(tiny_lm.tokenizer, EvalConfig(absorption_words=5000))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_kv_cached_prompts_equal_whole_prompts(arch):
    from fcsae.lm import make_tiny_model

    lm = make_tiny_model(arch, d_model=32, n_layers=3)
    parts = probe.prompt_parts(lm.tokenizer)
    vocab = probe.alpha_vocab(lm.tokenizer)
    prefix = probe.prefix_ids(parts, [(t, 0) for _, t in vocab[:4]])
    suffixes = [probe.suffix_ids(parts, t) for _, t in vocab[10:15]]
    pos = len(parts.sep)
    kv = probe._acts_kv(probe.plain_hf_model(lm), 1, prefix, suffixes, pos, batch=2)
    full = probe._acts_full(lm, 1, [prefix + s for s in suffixes], pos - len(suffixes[0]), batch=5)
    assert torch.allclose(kv, full, atol=1e-5, rtol=1e-4)
    # the template after the word cannot change the word's activation (causal): the truncation is exact
    whole = probe._acts_full(lm, 1, [prefix + s + parts.template for s in suffixes], -1 - len(parts.template), batch=5)
    assert torch.allclose(whole, full, atol=1e-5, rtol=1e-4)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FCSAE_HOME", str(tmp_path))
    return tmp_path


SMALL = EvalConfig(absorption_words=120, icl_examples=3, icl_prefixes=4, probe_f1_min=0.0, max_k=3, batch_size=2)


def test_eval_is_deterministic_and_the_cache_is_reused(tiny_lm, home, monkeypatch):
    lmc = LMConfig(model="tiny", layer=1)
    sae = DenseSAE(torch.randn(32, 48, generator=torch.Generator().manual_seed(0)),
                   torch.randn(48, 32, generator=torch.Generator().manual_seed(1)), relu=True)
    a = absorption.evaluate_absorption(sae, lmc, SMALL, 1.0, lm=tiny_lm, progress=False)
    calls = []
    real = absorption._compute_probe_data
    monkeypatch.setattr(absorption, "_compute_probe_data", lambda *x, **k: calls.append(1) or real(*x, **k))
    b = absorption.evaluate_absorption(sae, lmc, SMALL, 1.0, lm=tiny_lm, progress=False)
    assert calls == []
    assert a.summary == b.summary and a.per_letter.equals(b.per_letter)
    assert a.summary["n_letters"] >= 1
    # a corrupt entry (truncated tensor file) is recomputed, giving the same numbers
    f = store.entry_dir(absorption.KIND, absorption._material(tiny_lm, lmc, SMALL)) / store.TENSORS
    f.write_bytes(f.read_bytes()[:100])
    c = absorption.evaluate_absorption(sae, lmc, SMALL, 1.0, lm=tiny_lm, progress=False)
    assert calls == [1] and c.summary == a.summary


def test_whole_prompt_path_matches_the_shared_prefix_layout(tiny_lm, home):
    """icl_prefixes=0 (fresh examples per prompt, SAEBench's layout) runs and scores the same words."""
    lmc = LMConfig(model="tiny", layer=1)
    cfg = EvalConfig(**{**SMALL.__dict__, "icl_prefixes": 0})
    data = absorption.prepare_absorption_cache(lmc, cfg, lm=tiny_lm, progress=False)
    shared = absorption.prepare_absorption_cache(lmc, SMALL, lm=tiny_lm, progress=False)
    assert sorted(data.words_test) == sorted(shared.words_test)
    assert data.acts_test_ND.shape == shared.acts_test_ND.shape


def test_sae_width_mismatch_is_refused(tiny_lm, home):
    with pytest.raises(FcsaeInputError, match="d_in=16 does not match"):
        absorption.evaluate_absorption(identity_sae(16), LMConfig(model="tiny", layer=0), SMALL, 1.0, lm=tiny_lm,
                                       progress=False)


def test_a_dead_sae_gets_nan_scores_not_an_error(tiny_lm, monkeypatch):
    _, data = _planted()
    monkeypatch.setattr(absorption, "prepare_absorption_cache", lambda *a, **k: data)
    dead = DenseSAE(torch.zeros(32, 8), torch.randn(8, 32), relu=True)
    res = absorption.evaluate_absorption(dead, LMConfig(model="tiny", layer=0), EvalConfig(), 1.0, lm=tiny_lm,
                                         progress=False)
    assert math.isnan(res.summary["mean_absorption_fraction"]) and res.summary["n_letters_scored"] == 0
    assert res.per_letter.height == 0
