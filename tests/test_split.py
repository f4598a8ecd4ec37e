"""SplitPolicy: selection rules, the 2-means split on planted clusters, recycling, and the trainer end to end."""

import logging

import pytest
import torch

from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.errors import FcsaeInputError
from fcsae.resample import ResampleContext
from fcsae.sae import SparseAutoencoder
from fcsae.split import SplitPolicy, recycle_order, select_latents, split_encoders, two_means
from fcsae.tracker import FrequencyConsistencyTracker


def test_zscore_selects_exactly_above_threshold():
    score = torch.tensor([0.1, 0.2, 0.1, 5.0, 0.15, 0.0, 4.0, 0.1])
    eligible = torch.ones(8, dtype=torch.bool)
    eligible[6] = False  # a high score on an ineligible (dead) latent is ignored
    pop = torch.tensor([0.1, 0.2, 0.1, 5.0, 0.15, 0.1], dtype=torch.float64)  # positive, eligible
    thresh = pop.mean() + 1.0 * pop.std(unbiased=False)
    expect = [i for i in range(8) if eligible[i] and score[i] > 0 and score[i] > thresh]
    got = select_latents(score, eligible, SplitConfig(criterion="fc", rule="zscore", z=1.0)).tolist()
    assert got == expect == [3]
    # A lower z admits more, highest score first.
    got = select_latents(score, eligible, SplitConfig(criterion="fc", rule="zscore", z=-0.5)).tolist()
    thresh = pop.mean() - 0.5 * pop.std(unbiased=False)
    assert got == sorted([i for i in range(8) if eligible[i] and 0 < score[i] and score[i] > thresh],
                         key=lambda i: -float(score[i]))


def test_top_fraction_selects_highest_scores_ties_to_lower_index():
    score = torch.tensor([0.3, 0.9, 0.3, 0.0, 0.5, 0.7, 0.3, 0.1, 0.2, 0.05])
    eligible = torch.ones(10, dtype=torch.bool)
    # population: 9 positive scores -> floor(0.34 * 9) = 3 latents
    got = select_latents(score, eligible, SplitConfig(criterion="fc", rule="top_fraction", top_fraction=0.34)).tolist()
    assert got == [1, 5, 4]
    got = select_latents(score, eligible, SplitConfig(criterion="fc", rule="top_fraction", top_fraction=0.6)).tolist()
    assert got == [1, 5, 4, 0, 2]  # 0.3 ties: lower indices first
    assert select_latents(torch.zeros(4), torch.ones(4, dtype=torch.bool), SplitConfig(rule="top_fraction")).numel() == 0


def test_recycle_order_dead_first_then_least_frequent_never_selected():
    dead = torch.tensor([False, True, False, False, True, False])
    freq = torch.tensor([0.5, 0.3, 0.01, 0.2, 0.0, 0.001])
    assert recycle_order(dead, freq, torch.tensor([5])) == [4, 1, 2, 3, 0]


def test_two_means_recovers_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 3.0, 3.0
    x = torch.cat([a + 0.1 * torch.randn(30, 8, generator=g), b + 0.1 * torch.randn(20, 8, generator=g)])
    r1 = two_means(x, 10, torch.Generator().manual_seed(7))
    r2 = two_means(x, 10, torch.Generator().manual_seed(7))
    assert torch.equal(r1.assign_N, r2.assign_N)
    assert sorted(r1.sizes) == [20, 30]
    assert (r1.assign_N[:30] == r1.assign_N[0]).all() and (r1.assign_N[30:] != r1.assign_N[0]).all()
    assert two_means(torch.ones(5, 3), 10, torch.Generator().manual_seed(0)) is None


def test_split_encoders_fire_each_half_on_its_own_centroid_only():
    g = torch.Generator().manual_seed(0)
    parent = torch.randn(20, generator=g)
    cent = torch.stack([parent + torch.randn(20, generator=g), parent + torch.randn(20, generator=g)])
    enc = split_encoders(cent)
    pre = cent @ enc.W_2D.T + enc.b_2  # [centroid, half]
    norms = cent.norm(dim=1)
    torch.testing.assert_close(pre.diagonal(), norms)  # own centroid: its projection on the unit decoder row
    torch.testing.assert_close(pre.fliplr().diagonal(), -norms.flip(0))  # other centroid: off
    torch.testing.assert_close(enc.b_2, -norms)  # the origin (b_dec): off
    par = split_encoders(torch.stack([cent[0], 2 * cent[0]]))  # parallel centroids: plain directions
    assert torch.allclose(torch.nn.functional.cosine_similarity(par.W_2D, cent[0].expand(2, -1)), torch.ones(2))
    # act_2: the same decision boundary, pre-activation act_2[g] on the own centroid.
    act = torch.tensor([0.7, 2.5])
    scaled = split_encoders(cent, act_2=act)
    pre_s = cent @ scaled.W_2D.T + scaled.b_2
    torch.testing.assert_close(pre_s.diagonal(), act)
    torch.testing.assert_close(pre_s.fliplr().diagonal(), -act.flip(0))
    assert torch.equal(pre_s > 0, pre > 0)


def planted_sae_and_buffer(n_a=40, n_b=24, seed=0):
    """A TopK SAE whose latent 0 fires on two planted clusters (directions e0 and e1); latent 5 is dead."""
    D, F = 12, 8
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=F, activation="topk", k=1), seed=seed)
    g = torch.Generator().manual_seed(seed)
    e0, e1 = torch.eye(D)[0], torch.eye(D)[1]
    with torch.no_grad():
        mixed = (e0 + e1) / 2 ** 0.5
        sae.W_dec[0] = mixed
        sae.W_enc[:, 0] = mixed
        sae.b_enc.fill_(-10.0)
        sae.b_enc[0] = 0.0
        sae.b_dec.zero_()
    x = torch.cat([4 * e0 + 0.1 * torch.randn(n_a, D, generator=g), 4 * e1 + 0.1 * torch.randn(n_b, D, generator=g)])
    return sae, x[torch.randperm(len(x), generator=g)], (e0, e1)


def context(sae, x, tracker, dead_ids=(5,), seed=0, step=10):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    (sae(x).recon_BD - x).pow(2).sum().backward()
    opt.step()  # populate Adam moments
    dead = torch.zeros(sae.cfg.dict_size, dtype=torch.bool)
    dead[list(dead_ids)] = True
    return ResampleContext(sae, opt, x, dead, tracker, step, torch.Generator().manual_seed(seed))


def test_split_puts_the_two_latents_on_the_planted_clusters(caplog):
    sae, x, (e0, e1) = planted_sae_and_buffer()
    with torch.no_grad():
        before = sae(x)
    tracker = FrequencyConsistencyTracker(TrackerConfig(), 8, 12)
    tracker.update(before, x)
    assert tracker.scores().score_F.argmax() == 0
    ctx = context(sae, x, tracker)
    W_dec_before = sae.W_dec.detach().clone()
    enc_norm_before = float(sae.W_enc[:, 0].detach().norm())
    with caplog.at_level(logging.INFO, logger="fcsae.split"):
        events = SplitPolicy(SplitConfig(criterion="fc", rule="top_fraction", top_fraction=0.01, min_inputs=8))(ctx)
    assert len(events) == 1
    ev = events[0]
    assert ev.kind == "split" and ev.latent == 0 and ev.partner == 5 and ev.step == 10
    assert ev.score == pytest.approx(float(tracker_scores_before(x)))
    assert sorted(ev.group_sizes) == [24, 40]
    cos = torch.stack([sae.W_dec[0], sae.W_dec[5]]) @ torch.stack([e0, e1]).T
    # One latent on each cluster direction (which is which: latent 0 keeps the closer one, a tie here).
    assert (cos.max(1).values > 0.99).all() and cos.argmax(1).unique().numel() == 2
    assert torch.allclose(sae.W_dec[[0, 5]].norm(dim=1), torch.ones(2))
    # Each half's encoder is on at its own cluster and off, by as much, at the other;
    # its norm is capped by the split latent's encoder norm before the split.
    pre = (torch.stack([4 * e0, 4 * e1]) - sae.b_dec) @ sae.W_enc[:, [0, 5]] + sae.b_enc[[0, 5]]
    assert (pre.diagonal() > 0.5).all() and (pre.fliplr().diagonal() < -0.5).all()
    torch.testing.assert_close(pre.diagonal(), -pre.fliplr().diagonal(), atol=0.1, rtol=0.05)
    assert (sae.W_enc[:, [0, 5]].norm(dim=0) <= enc_norm_before * (1 + 1e-5)).all()
    # At the split latent's own magnitude on its inputs (4 cos 45 = 2.83), not the centroid's norm (4): the halves
    # add to each input what the latent did, so the reconstruction of its inputs does not jump. Uncapped, that
    # encoder has norm 2 x 2.83 / 4 = 1.41; the cap (the latent's norm, ~1) scales it down with its bias.
    want = 4 * 0.5 ** 0.5 * min(1.0, enc_norm_before / 2 ** 0.5)
    torch.testing.assert_close(pre.diagonal(), torch.full((2,), want), atol=0.1, rtol=0.03)
    # Others untouched; Adam moments and tracker stats of both reset.
    others = [1, 2, 3, 4, 6, 7]
    torch.testing.assert_close(sae.W_dec[others], W_dec_before[others])
    st = ctx.optimizer.state[sae.W_dec]
    assert st["exp_avg"][[0, 5]].abs().sum() == 0 and st["exp_avg_sq"][[0, 5]].abs().sum() == 0
    assert tracker.count_F[[0, 5]].sum() == 0
    assert "split latent 0" in caplog.text
    # Now both halves fire, each on its own cluster.
    with torch.no_grad():
        after = sae(x)
    fired = after.idx_BK[:, 0]
    assert set(fired.tolist()) == {0, 5}
    assert sorted([(fired == 0).sum().item(), (fired == 5).sum().item()]) == [24, 40]


def tracker_scores_before(x):
    sae, x2, _ = planted_sae_and_buffer()
    tr = FrequencyConsistencyTracker(TrackerConfig(), 8, 12)
    with torch.no_grad():
        tr.update(sae(x2), x2)
    return tr.scores().score_F[0]


def test_split_is_deterministic_given_generator():
    results = []
    for _ in range(2):
        sae, x, _ = planted_sae_and_buffer(seed=3)
        tracker = FrequencyConsistencyTracker(TrackerConfig(), 8, 12)
        with torch.no_grad():
            tracker.update(sae(x), x)
        SplitPolicy(SplitConfig(criterion="inconsistency", rule="top_fraction", top_fraction=0.01))(
            context(sae, x, tracker, seed=11))
        results.append(sae.W_dec.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_too_few_inputs_means_no_split():
    sae, x, _ = planted_sae_and_buffer(n_a=5, n_b=4)
    tracker = FrequencyConsistencyTracker(TrackerConfig(), 8, 12)
    with torch.no_grad():
        tracker.update(sae(x), x)
    ctx = context(sae, x, tracker)
    W = sae.W_dec.detach().clone()
    assert SplitPolicy(SplitConfig(criterion="fc", rule="top_fraction", min_inputs=10))(ctx) == []
    assert torch.equal(W, sae.W_dec.detach())
    assert len(SplitPolicy(SplitConfig(criterion="fc", rule="top_fraction", min_inputs=9))(ctx)) == 1


def test_max_splits_caps_and_partners_are_distinct():
    torch.manual_seed(0)
    D, F = 10, 16
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=F, activation="relu"), seed=1)
    x = torch.randn(300, D) * 2
    tracker = FrequencyConsistencyTracker(TrackerConfig(), F, D)
    with torch.no_grad():
        tracker.update(sae(x), x)
    freq = tracker.scores().freq_F
    order = torch.sort(freq, stable=True).indices.tolist()
    events = SplitPolicy(SplitConfig(criterion="frequency", rule="top_fraction", top_fraction=0.5, max_splits=3,
                                     min_inputs=4))(context(sae, x, tracker, dead_ids=()))
    assert len(events) == 3
    # Selected: the most frequent; partners: the least frequent, none of the 8 selected.
    assert [e.latent for e in events] == torch.sort(-freq, stable=True).indices[:3].tolist()
    assert [e.partner for e in events] == order[:3]


def test_bad_criterion_is_input_error():
    with pytest.raises(FcsaeInputError, match="criterion"):
        SplitConfig(criterion="entropy")
    with pytest.raises(FcsaeInputError, match="criterion"):
        SplitPolicy(SplitConfig(criterion="dead"))
    with pytest.raises(FcsaeInputError, match="kmeans_iters"):
        SplitConfig(kmeans_iters=0)


@pytest.mark.parametrize("criterion", ["none", "dead", "fc", "frequency", "inconsistency"])
def test_every_criterion_runs_end_to_end_in_the_trainer(criterion, tmp_path):
    from fcsae.toy import ToyConfig, make_toy
    from fcsae.trainer import Trainer

    toy = make_toy(ToyConfig(d=16, n_independent=8, n_groups=2, n_children=3, n_samples=4096), seed=0)
    tcfg = TrainerConfig(lr=2e-3, batch_size=256, total_tokens=256 * 60, resample_every=20, resample_until=0.5,
                         buffer_tokens=1024, dead_tokens=512, warmup_steps=5, log_every=10)
    split_cfg = SplitConfig(criterion=criterion, rule="top_fraction", top_fraction=0.05, min_inputs=4)
    trainer = Trainer(SparseAutoencoder(SAEConfig(d_in=16, dict_size=32, activation="topk", k=3), seed=0),
                      tcfg, split_cfg, TrackerConfig(enabled=True))
    batches = (toy.x_ND[i % 16 * 256:(i % 16 + 1) * 256] for i in range(10_000))
    events = trainer.fit(batches)
    assert trainer.step == 60
    if criterion in ("fc", "frequency", "inconsistency"):
        assert len(events) == 1 and events[0].kind == "split" and events[0].step == 20
        assert events[0].partner is not None and sum(events[0].group_sizes) >= 4
    elif criterion == "none":
        assert events == []
    assert all(e.kind == "resample" for e in events if criterion == "dead")
    fvu = trainer.last_metrics["fvu"]
    assert 0 <= fvu < 1.0
    # Tracker state goes through the checkpoint.
    trainer.save_checkpoint(tmp_path / "ck")
    again = Trainer.load_checkpoint(tmp_path / "ck")
    for a, b in zip(trainer.tracker.scores(), again.tracker.scores()):
        torch.testing.assert_close(a, b)


def test_split_encoders_norm_is_capped_for_nearly_parallel_centroids():
    # Real activations share a big common component: the orthogonal parts are short and
    # the uncapped encoder is long enough to win the top k everywhere.
    common = torch.zeros(6)
    common[0] = 20.0
    cent = torch.stack([common + 0.05 * torch.eye(6)[1], common + 0.05 * torch.eye(6)[2]])
    free = split_encoders(cent)
    assert (free.W_2D.norm(dim=1) > 100).all()
    capped = split_encoders(cent, max_norm=1.0)
    torch.testing.assert_close(capped.W_2D.norm(dim=1), torch.ones(2))
    # The same decision boundary: pre-activations keep their signs at both centroids.
    pre_free = cent @ free.W_2D.T + free.b_2
    pre_cap = cent @ capped.W_2D.T + capped.b_2
    assert torch.equal(pre_free > 0, pre_cap > 0)
