"""Absorption detectors on a hand-built SAE whose absorbers and absorbed parent are known, and against brute force."""

import pytest
import torch

from fcsae.config import TrackerConfig
from fcsae.detectors import (DETECTORS, coactivation, decoder_neighbours, detector_panel, encdec_disagreement,
                             sibling_score)
from fcsae.errors import FcsaeInputError
from fcsae.tracker import FrequencyConsistencyTracker
from tests._absorbed_sae import ABSORBERS, CLEAN, PARENT, absorbed_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _tracked(pl, consistency="normalized"):
    tr = FrequencyConsistencyTracker(TrackerConfig(enabled=True, consistency=consistency), 12, 16)
    for s in range(0, len(pl.x_ND), 100):
        x = pl.x_ND[s:s + 100]
        tr.update(pl.sae(x), x)
    return tr


def test_planted_sae_reconstructs_exactly():
    for act in ("relu", "topk"):
        pl = absorbed_sae(act, k=2)
        with torch.no_grad():
            assert torch.allclose(pl.sae(pl.x_ND).recon_BD, pl.x_ND, atol=1e-3)


def test_siblings_flag_the_group_and_match_brute_force():
    pl = absorbed_sae()
    s = sibling_score(pl.sae.W_dec, 0.25, chunk=5)  # several chunks
    U = pl.sae.W_dec / pl.sae.W_dec.norm(dim=1, keepdim=True)
    C = U @ U.T
    C.fill_diagonal_(0)
    assert torch.allclose(s, (C * (C > 0.25)).sum(1), atol=1e-6)
    assert float(s[ABSORBERS + [PARENT]].min()) > 1.0 > float(s[CLEAN].max()) == 0.0


def test_decoder_neighbours_are_the_chunked_top_k():
    pl = absorbed_sae()
    nb = decoder_neighbours(pl.sae.W_dec, m=3, chunk=5)
    U = pl.sae.W_dec / pl.sae.W_dec.norm(dim=1, keepdim=True)
    C = U @ U.T
    C.fill_diagonal_(-2)
    assert torch.allclose(nb.cos_FM, C.topk(3, dim=1).values, atol=1e-6)
    assert set(nb.idx_FM[PARENT].tolist()) == set(ABSORBERS)


def test_encdec_ranks_parent_then_absorbers_then_clean():
    pl = absorbed_sae()
    e = encdec_disagreement(pl.sae.W_enc, pl.sae.W_dec)
    assert float(e[PARENT]) == pytest.approx(1 - (1 + 3 * 1.5 ** 2) ** -0.5, abs=1e-5)  # cos(p - 1.5 sum c, p)
    assert torch.allclose(e[ABSORBERS], torch.full((3,), 1 - 2 ** -0.5), atol=1e-5)
    assert float(e[CLEAN].abs().max()) < 1e-5


@torch.no_grad()
def _coact_brute(sae, x, m, thresh):
    """Pair by pair, input by input."""
    nb = decoder_neighbours(sae.W_dec, m)
    lat = sae.encode(x)
    on = lat > 0
    U = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    proj = (x - sae.b_dec) @ U.T
    F = lat.shape[1]
    ratio = torch.zeros(F, nb.idx_FM.shape[1])
    for p in range(F):
        mean_act = float(lat[on[:, p], p].mean()) if bool(on[:, p].any()) else 0.0
        for k in range(nb.idx_FM.shape[1]):
            j = int(nb.idx_FM[p, k])
            if float(nb.cos_FM[p, k]) < thresh or mean_act == 0.0:
                continue
            rows = on[:, j]
            miss = [max(0.0, float(proj[b, p])) for b in range(len(x)) if rows[b] and not on[b, p]]
            ratio[p, k] = sum(miss) / max(1, int(rows.sum())) / mean_act
    return ratio


def test_coactivation_matches_brute_force_and_finds_the_parent():
    pl = absorbed_sae()
    x = pl.x_ND[:200]
    co = coactivation(pl.sae, x, 0.25, m=4, chunk=37)
    assert torch.allclose(co.ratio_FM, _coact_brute(pl.sae, x, 4, 0.25), atol=1e-5)
    # The parent is silent on every child input although its full magnitude is there.
    assert float(co.parent_F[PARENT]) == pytest.approx(1.0, abs=0.05)
    assert float(co.parent_F[PARENT]) > float(co.parent_F[ABSORBERS].max()) > float(co.parent_F[CLEAN].max())
    # The absorbers are what silences it.
    assert float(co.member_F[ABSORBERS].min()) > 0.9 > float(co.member_F[[PARENT] + CLEAN].max())


def test_seed_consistency_flags_absorbers_and_override_matches_config():
    pl = absorbed_sae()
    tr_n, tr_s = _tracked(pl), _tracked(pl, "seed")
    assert torch.allclose(tr_n.scores(consistency="seed").score_F, tr_s.scores().score_F)
    assert torch.allclose(tr_s.scores(consistency="normalized").consistency_F, tr_n.scores().consistency_F)
    inc = 1 - tr_s.scores().consistency_F
    assert float(inc[ABSORBERS].min()) > float(inc[CLEAN].max())
    with pytest.raises(FcsaeInputError, match="consistency"):
        tr_n.scores(consistency="bogus")


def test_panel_reports_every_detector_per_latent_and_refuses_missing_inputs():
    pl = absorbed_sae("topk", k=2)
    panel = detector_panel(pl.sae, _tracked(pl), pl.x_ND)
    assert list(panel) == list(DETECTORS)
    assert all(v.shape == (12,) and bool(torch.isfinite(v).all()) for v in panel.values())
    with pytest.raises(FcsaeInputError, match="tracker"):
        detector_panel(pl.sae, None, pl.x_ND, ["fc_seed"])
    with pytest.raises(FcsaeInputError, match="buffer"):
        detector_panel(pl.sae, None, None, ["coact"])
    with pytest.raises(FcsaeInputError, match="must be one of"):
        detector_panel(pl.sae, None, None, ["nope"])
