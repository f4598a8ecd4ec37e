"""Classic dead-latent resampling, Adam-row reset and policy dispatch."""

import pytest
import torch

from fcsae.config import SAEConfig, SplitConfig, TrackerConfig
from fcsae.policy import make_policy
from fcsae.resample import ENCODER_NORM_FRACTION, DeadResamplePolicy, ResampleContext, reset_adam_rows
from fcsae.sae import SparseAutoencoder

D, FN, K = 8, 32, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_sae_and_adam(activation="topk"):
    """An SAE whose Adam state is non-zero everywhere (a few steps on random data)."""
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=FN, activation=activation, k=K), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(64, D, generator=g)
        opt.zero_grad()
        # dense encode so that every latent gets gradient
        ((sae.decode(torch.relu(sae.pre_acts(x))) - x) ** 2).sum().backward()
        opt.step()
    return sae, opt


def test_reset_adam_rows_touches_only_chosen_latents():
    sae, opt = _trained_sae_and_adam()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in sae.parameters()}
    ids = [2, 17]
    reset_adam_rows(opt, sae, ids)
    other = torch.ones(FN, dtype=torch.bool)
    other[ids] = False
    for p, dim in ((sae.W_enc, 1), (sae.b_enc, 0), (sae.W_dec, 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            now, was = opt.state[p][key], before[id(p)][key]
            assert (now.index_select(dim, torch.tensor(ids)) == 0).all()
            kept = now.index_select(dim, other.nonzero().flatten())
            assert torch.equal(kept, was.index_select(dim, other.nonzero().flatten()))
            assert kept.abs().sum() > 0
    for key in ("exp_avg", "exp_avg_sq"):  # b_dec has no latent rows
        assert torch.equal(opt.state[sae.b_dec][key], before[id(sae.b_dec)][key])


def _ctx(sae, opt, buffer, dead, step=10, seed=0, tracker=None):
    return ResampleContext(sae, opt, buffer, dead, tracker, step, torch.Generator().manual_seed(seed))


def test_dead_resampling_touches_exactly_dead_latents():
    sae, opt = _trained_sae_and_adam()
    dead = torch.zeros(FN, dtype=torch.bool)
    dead_ids = [0, 5, 9]
    dead[dead_ids] = True
    W_enc0, W_dec0, b_enc0 = sae.W_enc.detach().clone(), sae.W_dec.detach().clone(), sae.b_enc.detach().clone()
    buffer = torch.randn(200, D, generator=torch.Generator().manual_seed(1)) * 3
    events = DeadResamplePolicy()(_ctx(sae, opt, buffer, dead))
    assert sorted(e.latent for e in events) == dead_ids
    assert all(e.kind == "resample" and e.step == 10 and e.partner is None for e in events)
    alive = ~dead
    assert torch.equal(sae.W_dec[alive], W_dec0[alive]) and torch.equal(sae.W_enc[:, alive], W_enc0[:, alive])
    assert torch.equal(sae.b_enc[alive], b_enc0[alive])
    assert not torch.equal(sae.W_dec[dead], W_dec0[dead])
    torch.testing.assert_close(sae.W_dec[dead].norm(dim=1), torch.ones(3))
    assert (sae.b_enc[dead] == 0).all()
    # encoder direction = decoder direction, scaled to 0.2 x mean alive encoder norm
    target = ENCODER_NORM_FRACTION * W_enc0[:, alive].norm(dim=0).mean()
    torch.testing.assert_close(sae.W_enc[:, dead].norm(dim=0), target.expand(3))
    torch.testing.assert_close(sae.W_enc[:, dead].t() / target, sae.W_dec[dead])
    for key in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[sae.W_dec][key][dead] == 0).all() and (opt.state[sae.W_dec][key][alive] != 0).any()
        assert (opt.state[sae.W_enc][key][:, dead] == 0).all()
        assert (opt.state[sae.b_enc][key][dead] == 0).all()


def test_inputs_sampled_by_reconstruction_error():
    """Only badly reconstructed inputs can be picked: a perfectly reconstructed buffer row never is."""
    sae, opt = _trained_sae_and_adam()
    with torch.no_grad():
        sae.b_dec.zero_()
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # nothing fires: recon = b_dec = 0, so error = ||x||^2
    good = torch.zeros(50, D)  # zero error: probability 0
    spike = torch.zeros(1, D)
    spike[0, 3] = 5.0
    buffer = torch.cat([good, spike, good])
    dead = torch.zeros(FN, dtype=torch.bool)
    dead[4] = True
    events = DeadResamplePolicy()(_ctx(sae, opt, buffer, dead))
    assert len(events) == 1 and events[0].score == pytest.approx(25.0)
    torch.testing.assert_close(sae.W_dec[4], torch.eye(D)[3])


def test_sampling_is_deterministic_given_generator_and_resets_tracker():
    class FakeTracker:
        def __init__(self):
            self.reset_ids = None

        def reset(self, ids):
            self.reset_ids = sorted(int(i) for i in ids)

    results = []
    for _ in range(2):
        sae, opt = _trained_sae_and_adam()
        dead = torch.zeros(FN, dtype=torch.bool)
        dead[[3, 4, 20]] = True
        tracker = FakeTracker()
        DeadResamplePolicy()(_ctx(sae, opt, torch.randn(100, D, generator=torch.Generator().manual_seed(2)), dead,
                                  tracker=tracker))
        assert tracker.reset_ids == [3, 4, 20]
        results.append(sae.W_dec.detach().clone())
    assert torch.equal(results[0], results[1])


def test_no_dead_no_events():
    sae, opt = _trained_sae_and_adam()
    W = sae.W_dec.detach().clone()
    assert DeadResamplePolicy()(_ctx(sae, opt, torch.randn(10, D), torch.zeros(FN, dtype=torch.bool))) == []
    assert torch.equal(W, sae.W_dec)


def test_make_policy_dispatch():
    t = TrackerConfig()
    assert make_policy(SplitConfig(criterion="none"), t) is None
    assert isinstance(make_policy(SplitConfig(criterion="dead"), t), DeadResamplePolicy)
    split = pytest.importorskip("fcsae.split")
    for crit in ("fc", "frequency", "inconsistency"):
        assert isinstance(make_policy(SplitConfig(criterion=crit), t), split.SplitPolicy)
