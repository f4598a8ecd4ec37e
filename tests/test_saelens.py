"""SAELens export: raw activations through SAELens's encode formula give fcsae's codes / norm_scale."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fcsae.config import SAEConfig
from fcsae.errors import FcsaeInputError
from fcsae.sae import SparseAutoencoder
from fcsae.saelens import export_saelens


def _saelens_encode(t, cfg, x_raw):
    """SAELens 6's TopK / standard encode, written out: act(((x - b_dec) @ W_enc + b_enc))."""
    pre = (x_raw - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "standard":
        return F.relu(pre)
    if cfg["architecture"] == "jumprelu":
        return F.relu(pre) * (pre > t["threshold"])
    vals, idx = pre.topk(cfg["k"], dim=1)
    return torch.zeros_like(pre).scatter(1, idx, F.relu(vals))


@pytest.mark.parametrize("activation", ["topk", "relu", "batchtopk"])
def test_export_encodes_raw_activations_to_fcsaes_codes(tmp_path, activation):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, dict_size=48, k=4, activation=activation), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if activation == "batchtopk":
            sae.threshold.fill_(0.8)
    s = 0.37
    out = export_saelens(sae, tmp_path / "sl", "tiny", 3, s, context_size=128, bos_token_id=1)
    cfg = json.loads((out / "cfg.json").read_text())
    t = load_file(str(out / "sae_weights.safetensors"))
    assert cfg["architecture"] == {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}[activation]
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"]
    md = cfg["metadata"]
    assert (md["model_name"], md["hook_name"], md["context_size"], md["prepend_bos"]) == (
        "tiny", "blocks.3.hook_resid_post", 128, True)
    assert md["fcsae_norm_scale"] == s
    x_raw = torch.randn(64, 16) * 5
    with torch.no_grad():
        ours = sae.encode(x_raw * s)
        recon_raw = sae.decode(ours) / s
    theirs = _saelens_encode(t, cfg, x_raw)
    assert torch.equal(theirs > 0, ours > 0)
    assert torch.allclose(theirs * s, ours, atol=1e-5)
    assert torch.allclose(theirs @ t["W_dec"] + t["b_dec"], recon_raw, atol=1e-5)
    assert torch.allclose(t["W_dec"].norm(dim=1), torch.ones(48), atol=1e-5)  # SAEBench's cos projection assumes it


def test_export_refuses_a_bad_scale(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, dict_size=16, k=2))
    with pytest.raises(FcsaeInputError, match="norm_scale"):
        export_saelens(sae, tmp_path / "x", "m", 0, 0.0)
    assert not (tmp_path / "x").exists()
