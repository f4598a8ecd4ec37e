"""BatchTopK and Matryoshka SAEs: batch selection, inference threshold, prefix loss, gradients, save/load, resume, bad input."""

import json

import pytest
import torch

from fcsae import cli
from fcsae.config import SAEConfig, SplitConfig, TrackerConfig
from fcsae.errors import FcsaeInputError
from fcsae.sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder, _Layout, batch_n, batch_topk
from fcsae.trainer import Trainer, matryoshka_loss
from tests.test_sae import _pair as sae_pair
from tests.test_trainer import _run, fake_cache, tcfg  # noqa: F401  (fake_cache is a fixture)

D, FN = 12, 48

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(activation, k=2.5, **kw):
    return SAEConfig(d_in=D, dict_size=FN, activation=activation, k=k, **kw)


def _pair(activation, k=2.5, **kw):
    """A fast and a dense SAE of ``activation`` with identical, non-trivial weights."""
    return sae_pair(_cfg(activation, k, **kw))


def _dense_codes(out, n_lat):
    if out.latents_BF is not None:
        return out.latents_BF
    return torch.zeros(len(out.acts_BK), n_lat).scatter_add(1, out.idx_BK, out.acts_BK)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("k, B", [(2.5, 7), (1.0, 33), (3.3, 64), (40.0, 5)])
def test_keeps_exactly_round_k_times_batch(activation, k, B):
    fast, dense = _pair(activation, k, **({"matryoshka_groups": "6,18,48"} if activation == "matryoshka" else {}))
    with torch.no_grad():
        fast.b_enc.add_(50.0)  # every pre-activation positive: the kept count is visible as nonzeros
        dense.b_enc.add_(50.0)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(B))
    n = round(k * B)
    pre_BF = fast.pre_acts(x)
    want = torch.zeros(B * FN, dtype=torch.bool)
    want[pre_BF.reshape(-1).topk(n).indices] = True
    for sae in (fast, dense):
        codes_BF = _dense_codes(sae(x), FN)
        assert int((codes_BF > 0).sum()) == n == batch_n(k, B)
        assert torch.equal(codes_BF.reshape(-1) > 0, want)  # the batch's n largest, wherever they are
    torch.testing.assert_close(_dense_codes(fast(x), FN), dense(x).latents_BF)


def test_batch_selection_is_uneven_across_tokens():
    """Unlike TopK, a high-norm token may take many latents and a low-norm one none."""
    sae = SparseAutoencoder(_cfg("batchtopk", 4), seed=0)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    x[0] *= 20
    x[1] *= 0.01
    per_token = (sae(x).acts_BK > 0).sum(1)
    assert per_token.sum() <= 64 and per_token[0] > 4 and per_token[1] < 4


def test_threshold_is_ema_of_smallest_kept_and_inference_is_batch_independent():
    sae = SparseAutoencoder(_cfg("batchtopk", 3), seed=0)
    g = torch.Generator().manual_seed(1)
    lows = []
    for _ in range(3):
        out = sae(torch.randn(40, D, generator=g))
        lows.append(float(out.acts_BK[out.acts_BK > 0].min().detach()))
        sae.update_threshold(out, 0.9)
    want = lows[0]
    for low in lows[1:]:
        want = 0.9 * want + 0.1 * low
    assert float(sae.threshold) == pytest.approx(want, rel=1e-6)
    x = torch.randn(30, D, generator=g)
    codes = sae.encode(x)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(codes, torch.where(pre > want, pre, torch.zeros_like(pre)))
    # One token's code is the same alone, in its batch, or among other tokens.
    others = torch.randn(50, D, generator=g) * 5
    for i in (0, 7, 29):
        torch.testing.assert_close(sae.encode(x[i:i + 1])[0], codes[i])
        torch.testing.assert_close(sae.encode(torch.cat([others, x[i:i + 1]]))[-1], codes[i])


def test_matryoshka_widths_and_weights():
    assert SAEConfig(d_in=4, dict_size=4096, activation="matryoshka").matryoshka_widths == (128, 384, 896, 1920, 4096)
    c = SAEConfig(d_in=4, dict_size=64, activation="matryoshka", matryoshka_groups=[8, 16, 64], matryoshka_weights="1,1,2")
    assert c.matryoshka_groups == "8,16,64" and c.matryoshka_widths == (8, 16, 64)
    assert c.matryoshka_level_weights == (0.25, 0.25, 0.5)
    assert SAEConfig(d_in=4, dict_size=64, activation="matryoshka", matryoshka_groups="1/4,3/4").matryoshka_widths == (16, 64)


@pytest.mark.parametrize("weights", ["", "1,2,5"])
def test_matryoshka_loss_equals_brute_force_sum_over_prefixes(weights):
    fast, dense = _pair("matryoshka", 4, matryoshka_groups="5,20,48", matryoshka_weights=weights)
    x = torch.randn(25, D, generator=torch.Generator().manual_seed(4))
    w = [1 / 3] * 3 if not weights else [1 / 8, 2 / 8, 5 / 8]
    for sae in (fast, dense):
        out = sae(x)
        lat_BF = _dense_codes(out, FN)
        brute = 0.0
        for wl, width in zip(w, (5, 20, 48)):
            recon = sae.b_dec + sum(lat_BF[:, i:i + 1] * sae.W_dec[i] for i in range(width))
            brute = brute + wl * (x - recon).pow(2).sum(1).mean()
        got = matryoshka_loss(out.prefix_recons_BLD, x, sae.level_weights)
        torch.testing.assert_close(got, brute, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.prefix_recons_BLD[:, -1], out.recon_BD)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka"])
def test_fast_gradients_match_dense_reference(activation):
    fast, dense = _pair(activation, 3.5, **({"matryoshka_groups": "4,12,48"} if activation == "matryoshka" else {}))
    x = torch.randn(37, D, generator=torch.Generator().manual_seed(5))
    dead = torch.zeros(FN, dtype=torch.bool)
    dead[::3] = True
    for sae in (fast, dense):
        t = Trainer(sae, tcfg(auxk_k=6, dead_tokens=1))
        t.tokens_since_fired_F[dead] = 10
        loss, parts, _ = t._losses(x, 0)
        assert "auxk" in parts and (activation == "batchtopk" or "matryoshka_mse" in parts)
        loss.backward()
    torch.testing.assert_close(fast(x).recon_BD, dense(x).recon_BD, atol=1e-5, rtol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(dense, name).grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka"])
def test_save_load_round_trip_as_jumprelu(tmp_path, activation):
    sae, _ = _pair(activation, 2.5)
    with torch.no_grad():
        sae.threshold.fill_(0.37)
    sae.save(tmp_path / "s", extra_tensors={"tracker.freq": torch.ones(FN)})
    raw = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    assert raw["architecture"] == "jumprelu" and raw["fcsae"]["activation"] == activation and raw["fcsae"]["k"] == 2.5
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "s" / WEIGHTS_FILE))
    torch.testing.assert_close(weights["threshold"], torch.full((FN,), 0.37))
    back, extra = SparseAutoencoder.load_with_extras(tmp_path / "s", expect=sae.cfg)
    assert set(extra) == {"tracker.freq"} and float(back.threshold) == pytest.approx(0.37)
    x = torch.randn(9, D)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x).recon_BD, sae(x).recon_BD)
    weights["threshold"][3] = 1.0
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / "s" / WEIGHTS_FILE))
    with pytest.raises(FcsaeInputError, match="threshold"):
        SparseAutoencoder.load(tmp_path / "s")


@pytest.mark.parametrize("activation, criterion", [("batchtopk", "dead"), ("matryoshka", "fc"), ("batchtopk", "fc")])
def test_resume_reproduces_uninterrupted(tmp_path, monkeypatch, activation, criterion):
    import tests.test_trainer as tt

    monkeypatch.setattr(tt, "SAEConfig", lambda **kw: SAEConfig(**{**kw, "k": 3.5, "matryoshka_groups": "4,16,64"
                                                                   if kw["activation"] == "matryoshka" else ""}))
    split = SplitConfig(criterion=criterion, min_inputs=2, rule="top_fraction", top_fraction=0.05)
    tracker = TrackerConfig(enabled=True) if criterion == "dead" else TrackerConfig()
    full = _run(tmp_path / "a", 30, split, tracker, activation)
    assert full.events and full.sae.cfg.activation == activation and full.sae.cfg.k == 3.5
    resumed = _run(tmp_path / "b", 30, split, tracker, activation, stop_at=10)
    assert resumed.step == full.step == 30 and resumed.events == full.events
    assert float(full.sae.threshold) > 0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(resumed.sae, name), getattr(full.sae, name), atol=1e-5, rtol=1e-4)
    for key, val in full.tracker.state_dict().items():
        torch.testing.assert_close(resumed.tracker.state_dict()[key], val, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka"])
def test_training_learns_and_inference_l0_is_near_k(activation):
    from tests.test_trainer import K, stream

    sae = SparseAutoencoder(SAEConfig(d_in=16, dict_size=64, activation=activation, k=K), seed=0)
    t = Trainer(sae, tcfg(total_tokens=64 * 80, threshold_decay=0.8))
    t.fit(stream())
    assert t.last_metrics["fvu"] < 0.5
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    x = torch.cat([next(stream(seed=7)) for _ in range(4)])
    l0 = float((sae.encode(x) > 0).sum(1).float().mean())
    assert 0.5 * K < l0 < 2 * K


@pytest.mark.parametrize("kw, message", [
    (dict(activation="matryoshka", matryoshka_groups="16,8,48"), "strictly increasing"),
    (dict(activation="matryoshka", matryoshka_groups="8,16,32"), "last prefix width must be dict_size=48"),
    (dict(activation="matryoshka", matryoshka_groups="0.5,0.4"), "fractions must sum to 1"),
    (dict(activation="matryoshka", matryoshka_groups="1/4,x"), "'x' is not a number"),
    (dict(activation="matryoshka", matryoshka_groups="8,48", matryoshka_weights="1,2,3"), "one weight per prefix"),
    (dict(activation="batchtopk", k=49), "k: must be a number in [1, dict_size=48]"),
    (dict(activation="topk", k=2.5), "topk keeps a whole number"),
])
def test_bad_config_one_line(kw, message):
    with pytest.raises(FcsaeInputError) as e:
        SAEConfig(d_in=D, dict_size=FN, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--activation", "matryoshka", "--matryoshka-groups", "32,16,64"], "strictly increasing"),
    (["--activation", "matryoshka", "--matryoshka-groups", "16,32"], "last prefix width must be dict_size=64"),
    (["--activation", "matryoshka", "--matryoshka-groups", "0.3,0.3"], "fractions must sum to 1"),
    (["--activation", "batchtopk", "--k", "65"], "k: must be a number in [1, dict_size=64]"),
    (["--activation", "topk", "--k", "2.5"], "topk keeps a whole number"),
])
def test_cli_bad_architecture_input_exit_2(fake_cache, tmp_path, capsys, flags, message):
    rc = cli.main(["train", "--cache", str(fake_cache), "--out", str(tmp_path / "o"), "--dict-size", "64", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # ~15 s of CPU: two subprocesses building the 65k-sample toy
def test_toy_benchmark_architecture_axis_ends_with_its_headline(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_absorption.py"
    run = subprocess.run([sys.executable, str(script), "--activation", "topk,matryoshka", "--criteria", "none", "--k", "4,2",
                          "--seeds", "1", "--steps", "15", "--resample-every", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("toy_architectures: ratio=") and "at k=2, below the true L0" in last
    bad = subprocess.run([sys.executable, str(script), "--activation", "topk", "--k", "2.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "topk keeps a whole number" in bad.stderr and bad.stdout.count("\n") == 0


def _uneven_pre(B, Fn, seed):
    """Pre-activations whose batch top-n is very uneven: a few tokens hold most of the batch's largest entries."""
    g = torch.Generator().manual_seed(seed)
    pre_BF = torch.randn(B, Fn, generator=g)
    pre_BF[0] += 6.0  # one token takes nearly all of the budget
    pre_BF[1:4] += 3.0
    pre_BF[-1] -= 9.0  # and one keeps nothing
    return pre_BF


@pytest.mark.parametrize("B, Fn, k", [(64, 256, 2.0), (33, 97, 3.5), (8, 40, 5.0), (16, 24, 12.0)])
def test_batch_topk_exact_on_uneven_rows(B, Fn, k):
    """Against the brute-force flat top-n: the same entries kept, each row's kept ones first, padding 0 at unkept columns."""
    pre_BF = _uneven_pre(B, Fn, B)
    n = batch_n(k, B)
    vals_BK, idx_BK, m_B = batch_topk(pre_BF, n, k, with_counts=True)
    want_BF = torch.zeros(B * Fn, dtype=torch.bool)
    want_BF[pre_BF.reshape(-1).topk(n).indices] = True
    want_BF = want_BF.view(B, Fn)
    assert int(m_B.sum()) == n and torch.equal(m_B, want_BF.sum(1))
    if 4 * k < Fn:  # else the first pass already takes whole rows (the last case)
        assert int(m_B.max()) > 4 * k  # the busiest row exceeds the first candidate pass: the whole-row path ran
    real_BK = torch.arange(idx_BK.shape[1])[None, :] < m_B[:, None]
    got_BF = torch.zeros(B, Fn, dtype=torch.bool)
    got_BF[torch.arange(B)[:, None].expand_as(idx_BK)[real_BK], idx_BK[real_BK]] = True
    assert torch.equal(got_BF, want_BF)
    torch.testing.assert_close(vals_BK[real_BK], pre_BF.gather(1, idx_BK)[real_BK])
    assert bool((vals_BK[~real_BK] == 0).all())
    assert not bool(want_BF.gather(1, idx_BK)[~real_BK].any())  # no padding index is a kept column


def test_ragged_layout_products_match_dense_references():
    """``_Layout`` with ``counts_B``: the bag, scatter and dots over the real pairs equal their dense forms."""
    pre_BF = _uneven_pre(20, 50, 3)
    vals_BK, idx_BK, m_B = batch_topk(pre_BF, batch_n(3.0, 20), 3.0, with_counts=True)
    lay = _Layout(idx_BK, 50, m_B)
    g = torch.Generator().manual_seed(4)
    w_BK = torch.randn(idx_BK.shape, generator=g)
    real_BK = torch.arange(idx_BK.shape[1])[None, :] < m_B[:, None]
    w_BF = torch.zeros(20, 50).scatter_add(1, idx_BK, w_BK * real_BK)
    M_FD, y_BD = torch.randn(50, 7, generator=g), torch.randn(20, 7, generator=g)
    torch.testing.assert_close(lay.bag(M_FD, w_BK), w_BF @ M_FD)
    torch.testing.assert_close(lay.scatter(w_BK, y_BD), w_BF.t() @ y_BD)
    torch.testing.assert_close(lay.dots(y_BD, M_FD), (y_BD @ M_FD.t()).gather(1, idx_BK) * real_BK)
    order, crow, col = lay.sorted()
    assert order.numel() == int(m_B.sum()) == int(crow[-1])  # padding is in no product


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka"])
def test_fast_gradients_match_dense_reference_on_uneven_batch(activation):
    fast, dense = _pair(activation, 3.0, **({"matryoshka_groups": "4,12,48"} if activation == "matryoshka" else {}))
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(6))
    x[0] *= 40.0  # this token takes most of the batch's latents
    assert int((fast(x).acts_BK[0] > 0).sum()) > 4 * 3.0
    for sae in (fast, dense):
        Trainer(sae, tcfg())._losses(x, 0)[0].backward()
    torch.testing.assert_close(fast(x).recon_BD, dense(x).recon_BD, atol=1e-4, rtol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(dense, name).grad, atol=1e-4, rtol=1e-4)
