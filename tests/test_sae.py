"""SparseAutoencoder: shapes, fast vs dense TopK, init, decoder-norm helpers, save/load."""

import json

import pytest
import torch

from fcsae.config import SAEConfig
from fcsae.errors import FcsaeInputError
from fcsae.sae import CFG_FILE, WEIGHTS_FILE, SparseAutoencoder, geometric_median

D, FN, K = 12, 48, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(cfg=None):
    """A fast and a dense SAE (TopK unless ``cfg`` says otherwise) with identical, non-trivial weights."""
    cfg = cfg or SAEConfig(d_in=D, dict_size=FN, k=K)
    fast = SparseAutoencoder(cfg, fast=True, seed=1)
    dense = SparseAutoencoder(cfg, fast=False, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        fast.b_enc.normal_(generator=g)
        fast.b_dec.normal_(generator=g)
        fast.W_enc.add_(0.3 * torch.randn(D, FN, generator=g))
    dense.load_state_dict(fast.state_dict())
    return fast, dense


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_shapes(activation):
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, activation=activation, k=K))
    x = torch.randn(7, D)
    out = sae(x)
    assert out.recon_BD.shape == (7, D)
    assert sae.encode(x).shape == (7, FN)
    assert sae.decode(sae.encode(x)).shape == (7, D)
    assert (sae.W_enc.shape, sae.b_enc.shape, sae.W_dec.shape, sae.b_dec.shape) == ((D, FN), (FN,), (FN, D), (D,))
    if activation == "topk":
        assert out.acts_BK.shape == out.idx_BK.shape == (7, K) and out.latents_BF is None
        assert ((sae.encode(x) > 0).sum(1) <= K).all()
    else:
        assert out.acts_BK is None and out.idx_BK is None and out.latents_BF.shape == (7, FN)
    # encode/decode agree with forward
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon_BD, atol=1e-5, rtol=1e-5)


def test_init_unit_decoder_and_tied_encoder():
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K), seed=4)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(FN))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    other = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K), seed=5)
    assert not torch.equal(sae.W_dec, other.W_dec)


def test_fast_matches_dense_forward_and_gradients():
    fast, dense = _pair()
    x = torch.randn(33, D, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(FN, dtype=torch.bool)
    dead[::4] = True
    for sae in (fast, dense):
        out, aux = sae.forward_aux(x, dead, 6)
        loss = (out.recon_BD - x).pow(2).sum() + 0.5 * (sae.decode_aux(aux) - x).pow(2).sum()
        loss.backward()
    of, od = fast(x), dense(x)
    torch.testing.assert_close(of.recon_BD, od.recon_BD, atol=1e-5, rtol=1e-5)
    # same active set (order may differ): compare as dense latents
    torch.testing.assert_close(fast.encode(x), dense.encode(x))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        gf, gd = getattr(fast, name).grad, getattr(dense, name).grad
        assert gd.abs().max() > 0
        torch.testing.assert_close(gf, gd, atol=1e-4, rtol=1e-4, msg=f"grad of {name}")


def test_aux_latents_are_dead_only():
    fast, dense = _pair()
    x = torch.randn(20, D)
    dead = torch.zeros(FN, dtype=torch.bool)
    dead[[1, 7, 30]] = True
    for sae in (fast, dense):
        _, aux = sae.forward_aux(x, dead, 8)  # more requested than dead: capped at 3
        assert aux.idx_BA.shape == (20, 3)
        assert dead[aux.idx_BA].all()
    assert fast.forward_aux(x, torch.zeros(FN, dtype=torch.bool), 8)[1] is None


def test_decoder_norm_helpers():
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K))
    sae.W_dec.grad = torch.randn(FN, D)
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(FN, 1) * 3 + 0.1)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(FN))


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * 0.1
    x[:20] += 100.0  # 10% far outliers drag the mean, not the median
    med = geometric_median(x)
    assert med.norm() < 1.0 < x.mean(0).norm()
    dist = lambda c: (x - c).norm(dim=1).sum()
    assert dist(med) < dist(x.mean(0)) and dist(med) <= dist(med + 0.05 * torch.randn(3, generator=g))
    sae = SparseAutoencoder(SAEConfig(d_in=3, dict_size=8, k=2))
    sae.init_b_dec(x, "mean")
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    with pytest.raises(FcsaeInputError, match="b_dec init"):
        sae.init_b_dec(x, "mode")


@pytest.mark.parametrize("activation", ["topk", "relu"])
def test_save_load_round_trip(tmp_path, activation):
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, activation=activation, k=K), seed=6)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    extra = {"tracker.freq_F": torch.rand(FN)}
    sae.save(tmp_path / "s", extra_tensors=extra)
    cfg = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"]) == (D, FN, activation)
    loaded, extras = SparseAutoencoder.load_with_extras(tmp_path / "s")
    assert loaded.cfg == sae.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    torch.testing.assert_close(extras["tracker.freq_F"], extra["tracker.freq_F"])
    x = torch.randn(4, D)
    torch.testing.assert_close(loaded(x).recon_BD, sae(x).recon_BD)
    assert not list((tmp_path / "s").glob(".*tmp"))  # no temp files left behind


def test_load_refuses_mismatch(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, k=K))
    sae.save(tmp_path / "s")
    with pytest.raises(FcsaeInputError, match="does not match"):
        SparseAutoencoder.load(tmp_path / "s", expect=SAEConfig(d_in=D, dict_size=FN, k=K + 1))
    # cfg.json claims a bigger dictionary than the weights hold
    cfg = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    cfg["d_sae"] = cfg["fcsae"]["dict_size"] = FN * 2
    (tmp_path / "s" / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(FcsaeInputError, match="shape"):
        SparseAutoencoder.load(tmp_path / "s")
    cfg["d_sae"] = FN
    (tmp_path / "s" / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(FcsaeInputError, match="disagree"):
        SparseAutoencoder.load(tmp_path / "s")
    (tmp_path / "s" / CFG_FILE).write_text("{not json")
    with pytest.raises(FcsaeInputError, match="JSON"):
        SparseAutoencoder.load(tmp_path / "s")
    with pytest.raises(FcsaeInputError, match="no such file"):
        SparseAutoencoder.load(tmp_path / "nowhere")
    sae.save(tmp_path / "t")
    (tmp_path / "t" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(FcsaeInputError, match="safetensors"):
        SparseAutoencoder.load(tmp_path / "t")
    with pytest.raises(FcsaeInputError, match="collides"):
        sae.save(tmp_path / "u", extra_tensors={"W_dec": torch.zeros(1)})


@pytest.mark.parametrize("kwargs, field", [
    ({"k": FN + 1}, "k"), ({"dict_size": 0}, "dict_size"), ({"activation": "gelu"}, "activation"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(FcsaeInputError, match=field):
        SAEConfig(d_in=D, **{"dict_size": FN, "k": K, **kwargs})
