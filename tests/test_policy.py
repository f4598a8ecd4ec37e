"""The criterion/operation table, the one latent re-initialisation path, typed events, and plugging in a new row."""

import dataclasses
import json

import pytest
import torch

from fcsae import config, policy
from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.errors import FcsaeInputError
from fcsae.resample import LatentEvent, ResampleContext, reinit_latents
from fcsae.sae import SparseAutoencoder
from fcsae.tracker import FrequencyConsistencyTracker

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_table_entry_resolves_and_config_takes_names_from_the_table():
    assert config.CRITERIA == tuple(policy.CRITERIA) and config.OPERATIONS == tuple(policy.OPERATIONS)
    for name, row in policy.CRITERIA.items():
        assert row.doc
        if row.policy is not None:
            assert callable(policy.load(row.policy))
        assert (row.score is not None or row.detector is not None) == row.needs_tracker == policy.scored(name)
        assert row.score is None or row.detector is None  # a criterion ranks by one thing
    for op in policy.OPERATIONS.values():
        assert callable(policy.load(op.fn))
    with pytest.raises(FcsaeInputError, match="operation: must be one of split"):
        SplitConfig(operation="bogus")


def test_make_policy_and_needs_tracker_follow_the_table():
    assert policy.make_policy(SplitConfig(criterion="none")) is None
    for name, row in policy.CRITERIA.items():
        p = policy.make_policy(SplitConfig(criterion=name))
        if row.policy is not None:
            assert type(p) is policy.load(row.policy)
        assert policy.needs_tracker(SplitConfig(criterion=name), TrackerConfig()) == row.needs_tracker
        assert policy.needs_tracker(SplitConfig(criterion=name), TrackerConfig(enabled=True))


def test_policy_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, fcsae.config, fcsae.policy; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


D, F = 6, 10


def _state():
    sae = SparseAutoencoder(SAEConfig(d_in=D, dict_size=F, activation="topk", k=2), seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0))
    tracker = FrequencyConsistencyTracker(TrackerConfig(), F, D)
    for _ in range(2):
        opt.zero_grad()
        ((sae.decode(torch.relu(sae.pre_acts(x))) - x) ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            tracker.update(sae(x), x)
    counters = torch.arange(F, dtype=torch.long) + 100
    ctx = ResampleContext(sae, opt, x, counters > 10**9, tracker, 7, torch.Generator().manual_seed(0), counters)
    return ctx


def test_reinit_latents_resets_exactly_the_given_latents_everywhere():
    ctx = _state()
    sae, opt, tracker = ctx.sae, ctx.optimizer, ctx.tracker
    before = {n: getattr(sae, n).detach().clone() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    adam = {n: {k: v.clone() for k, v in opt.state[getattr(sae, n)].items()} for n in ("W_enc", "b_enc", "W_dec")}
    stats = tracker.state_dict()
    ids = [1, 7]
    new_dec, new_enc = torch.randn(2, D), torch.randn(2, D)
    reinit_latents(ctx, ids, new_dec, new_enc, torch.tensor([0.5, -0.5]))
    keep = [i for i in range(F) if i not in ids]
    torch.testing.assert_close(sae.W_dec[ids], new_dec)
    torch.testing.assert_close(sae.W_enc[:, ids], new_enc.T)
    torch.testing.assert_close(sae.b_enc[ids], torch.tensor([0.5, -0.5]))
    assert torch.equal(sae.W_dec[keep], before["W_dec"][keep]) and torch.equal(sae.b_dec, before["b_dec"])
    assert torch.equal(sae.W_enc[:, keep], before["W_enc"][:, keep]) and torch.equal(sae.b_enc[keep], before["b_enc"][keep])
    for n, dim in (("W_enc", 1), ("b_enc", 0), ("W_dec", 0)):
        for key in ("exp_avg", "exp_avg_sq"):
            now, was = opt.state[getattr(sae, n)][key], adam[n][key]
            assert (now.index_select(dim, torch.tensor(ids)) == 0).all()
            assert torch.equal(now.index_select(dim, torch.tensor(keep)), was.index_select(dim, torch.tensor(keep)))
    for name in ("freq_F", "updates_F", "sum_FD", "sqsum_F", "weight_F", "count_F"):
        now = getattr(tracker, name)
        assert (now[ids] == 0).all() and torch.equal(now[keep], stats[name][keep]), name
    assert torch.equal(tracker.data_sum_D, stats["data_sum_D"])  # the data mean is not a latent's
    assert (ctx.tokens_since_fired_F[ids] == 0).all()
    assert torch.equal(ctx.tokens_since_fired_F[keep], torch.tensor(keep) + 100)


def test_latent_event_round_trips_through_json():
    ev = LatentEvent(3, "split", 4, 9, 0.25, (10, 12))
    d = json.loads(json.dumps(ev.to_dict()))
    assert d == {"step": 3, "kind": "split", "latent": 4, "partner": 9, "score": 0.25, "group_sizes": [10, 12],
                 "siblings": None}
    assert LatentEvent.from_dict(d) == ev and ev.latents == [4, 9]
    assert LatentEvent.from_dict(LatentEvent(1, "resample", 2, score=1.0).to_dict()).latents == [2]
    ext = LatentEvent(5, "extract", 3, 7, 0.5, (2, 40), siblings=(3, 8))
    assert LatentEvent.from_dict(json.loads(json.dumps(ext.to_dict()))) == ext and ext.latents == [3, 7, 8]


def test_a_new_criterion_and_operation_plug_in_at_the_table(monkeypatch):
    """One row each: a criterion scored by frequency, and an operation that points the latent at the inputs' mean."""
    calls = []

    def mean_op(ctx, cfg, lat, x_ND, partner):
        calls.append((lat, partner, x_ND.shape[0]))
        mean_D = x_ND.mean(0, keepdim=True)
        reinit_latents(ctx, [lat], mean_D / mean_D.norm(), mean_D, torch.zeros(1))
        return LatentEvent(ctx.step, "mean", lat)

    import sys
    import types

    mod = types.ModuleType("fcsae_test_plugin")
    mod.mean_op = mean_op
    monkeypatch.setitem(sys.modules, "fcsae_test_plugin", mod)
    monkeypatch.setitem(policy.CRITERIA, "busy", dataclasses.replace(policy.CRITERIA["frequency"], doc="busy"))
    monkeypatch.setitem(policy.OPERATIONS, "mean", policy.Operation("mean direction", "fcsae_test_plugin:mean_op"))
    from fcsae.trainer import Trainer

    split_cfg = SplitConfig(criterion="busy", operation="mean", rule="top_fraction", top_fraction=0.2, min_inputs=2)
    tcfg = TrainerConfig(lr=1e-3, batch_size=64, total_tokens=64 * 8, resample_every=4, resample_until=0.6,
                         buffer_tokens=256, warmup_steps=1, log_every=4)
    trainer = Trainer(SparseAutoencoder(SAEConfig(d_in=D, dict_size=F, activation="topk", k=2), seed=0), tcfg, split_cfg)
    assert trainer.tracker is not None  # the row's needs_tracker
    g = torch.Generator().manual_seed(1)
    events = trainer.fit(torch.randn(64, D, generator=g) for _ in range(8))
    assert calls and [e.kind for e in events] == ["mean"] * len(calls) and all(e.score is not None for e in events)
    assert trainer.events == events
