"""Absorption eval: hand-built absorption cases, split features, the prompt/probe cache, determinism, bad input."""

import math

import numpy as np

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


def test_vocabulary_is_saebenchs_and_the_split_is_a_random_80_20(tiny_lm):
    tok = tiny_lm.tokenizer
    pool = probe.alpha_vocab(tok)
    # brute force: every non-special token whose text is ASCII letters after at most one leading space
    special = set(tok.all_special_ids)
    want = sorted(tid for t, tid in tok.get_vocab().items() if tid not in special
                  and (lambda s: s.isascii() and s.isalpha())(probe._token_string(tok, t).removeprefix(" ")))
    assert [t for _, t in pool] == want
    assert any(not w.startswith(" ") for w, _ in pool) and any(w.startswith(" ") for w, _ in pool)
    full = probe.sample_vocab(tok, EvalConfig(absorption_words=0, seed=3))
    assert sorted(full.token_ids) == want  # 0 = the whole vocabulary
    v = probe.sample_vocab(tok, EvalConfig(absorption_words=100, seed=3))
    assert len(v.words) == 100 and len(set(v.words)) == 100 and sum(v.is_train) == 80
    assert v.labels == [LETTERS.index(w.strip()[0].lower()) for w in v.words]
    assert v == probe.sample_vocab(tok, EvalConfig(absorption_words=100, seed=3))
    assert v != probe.sample_vocab(tok, EvalConfig(absorption_words=100, seed=4))


def test_too_few_alphabetic_tokens_is_a_clear_error(tiny_lm):
    with pytest.raises(FcsaeInputError, match="only .* single-token alphabetic words"):
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
    real = absorption._compute_acts
    monkeypatch.setattr(absorption, "_compute_acts", lambda *x, **k: calls.append(1) or real(*x, **k))
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


# ------------------------------------------------------------------ probe convention, interval, degenerate, refusal


def _low_variance_case():
    """Letter a's signal sits on dim 0 (noise 0.3) and, equally informative, on dim 1 (noise 0.003).

    Six of letter a's ten test words carry a token direction (dims 28, 29) that switches the main latent
    (decoder e0) off and fires a token latent with decoder (e0 + e_28/29)/sqrt2. SAEBench's raw-activation
    probe leans on the high-variance dim 0, so that token latent is aligned with it (cos >= 0.1) and absorbs;
    the standardised probe divides by the tiny scale of dim 1 and points almost along e1, so no latent is
    aligned with it and nothing counts as absorbed (the field's 0.41 vs 0.005 in miniature).
    """
    g = torch.Generator().manual_seed(0)
    D = 32

    def make(n, absorbed=0):
        xs, ys = [], []
        for letter in range(26):
            for j in range(n):
                v = 0.3 * torch.randn(D, generator=g)
                v[1] = 0.003 * torch.randn((), generator=g)
                if letter == 0:
                    v[0] += 4
                    v[1] += 0.04
                    if j < absorbed:
                        v[28 + j % 2] += 4
                else:
                    v[letter + 1] += 4
                xs.append(v)
                ys.append(letter)
        return torch.stack(xs), torch.tensor(ys)

    x_tr, y_tr = make(40)
    x_te, y_te = make(10, absorbed=6)
    W_enc, W_dec = torch.zeros(D, 30), torch.zeros(30, D)
    W_enc[0, 0], W_enc[28, 0], W_enc[29, 0], W_dec[0, 0] = 1.0, -4.0, -4.0, 1.0
    for letter in range(1, 26):
        W_enc[letter + 1, letter] = W_dec[letter, letter + 1] = 1.0
    for t in (28, 29):
        W_enc[t, t] = 1.0
        W_dec[t, 0] = W_dec[t, t] = 1 / math.sqrt(2)
    return DenseSAE(W_enc, W_dec, relu=True), (x_tr, y_tr, x_te, y_te)


def test_probe_convention_switch_changes_the_score_in_the_expected_direction():
    sae, (x_tr, y_tr, x_te, y_te) = _low_variance_case()
    got = {}
    for convention in ("saebench", "standardized"):
        W, b, metrics = probe.train_probe(x_tr.double().numpy(), y_tr.numpy(), x_te.double().numpy(), y_te.numpy(),
                                          convention=convention)
        data = ProbeData(x_tr, x_te, y_tr, y_te, [f"w{i}" for i in range(len(y_te))],
                         torch.from_numpy(W).float(), torch.from_numpy(b).float(), metrics)
        res = absorption._score_sae(sae, data, 1.0, EvalConfig(max_k=1), list(range(26)))
        got[convention] = res.per_letter.row(0, named=True)
        assert got[convention]["main_latents"] == [0] and got[convention]["num_probe_true_positives"] == 10
    assert got["saebench"]["mean_absorption_fraction"] == pytest.approx(0.6)
    assert got["standardized"]["mean_absorption_fraction"] == 0.0


def test_the_interval_narrows_with_more_words():
    from fcsae.evals.absorption_stats import bootstrap_interval

    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 100, 1000):
        fractions = [rng.uniform(0, 1, n) * (rng.uniform(size=n) < 0.3) for _ in range(20)]
        lo, hi = bootstrap_interval(fractions, 500, seed=0)
        mean = np.mean([f.mean() for f in fractions])
        assert lo <= mean <= hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_a_random_decoder_sae_is_flagged_degenerate():
    from fcsae.evals.absorption_stats import verdict

    good_sae, (x_tr, y_tr, x_te, y_te) = _low_variance_case()
    W, b, metrics = probe.train_probe(x_tr.double().numpy(), y_tr.numpy(), x_te.double().numpy(), y_te.numpy())
    data = ProbeData(x_tr, x_te, y_tr, y_te, [f"w{i}" for i in range(len(y_te))],
                     torch.from_numpy(W).float(), torch.from_numpy(b).float(), metrics)
    good = absorption._score_sae(good_sae, data, 1.0, EvalConfig(), list(range(26))).summary
    assert good["meaningful"] and good["letters_with_latent"] >= 25
    W_dec = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    random_sae = DenseSAE(W_dec.T.clone(), W_dec, relu=True)
    bad = absorption._score_sae(random_sae, data, 1.0, EvalConfig(), list(range(26))).summary
    assert not bad["meaningful"] and bad["letters_with_latent"] < 13
    assert verdict(bad).startswith("Degenerate SAE: only ")
    assert "first-letter latent" in verdict(good)


def test_too_few_passing_letters_refuse_in_strict_mode_and_warn_otherwise(tiny_lm, monkeypatch, caplog):
    sae, data = _planted()
    metrics = [dict(m, f1=0.5) if m["letter"] in "abcdefghij" else m for m in data.probe_metrics]
    monkeypatch.setattr(absorption, "prepare_absorption_cache", lambda *a, **k: data._replace(probe_metrics=metrics))
    lmc = LMConfig(model="tiny", layer=0)
    with pytest.raises(absorption.AbsorptionRefused, match="only 16 letters pass .* SAEBench needs 20"):
        absorption.evaluate_absorption(sae, lmc, EvalConfig(), 0.5, lm=tiny_lm, progress=False, strict=True)
    res = absorption.evaluate_absorption(sae, lmc, EvalConfig(), 0.5, lm=tiny_lm, progress=False)
    assert "SAEBench needs 20" in res.summary["warning"] and not res.summary["meaningful"]
    assert res.summary["n_letters"] == 16
