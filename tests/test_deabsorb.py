"""Detector criteria and the extract operation in the policy table: selection, groups, events, trainer end to end."""

import pytest
import torch

from fcsae import policy
from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.errors import FcsaeInputError
from fcsae.extract import sibling_group
from fcsae.resample import ResampleContext
from fcsae.sae import SparseAutoencoder
from fcsae.split import SplitPolicy
from fcsae.tracker import FrequencyConsistencyTracker
from tests._absorbed_sae import ABSORBERS, CLEAN, PARENT, UNUSED, absorbed_sae

pytestmark = pytest.mark.usefixtures("one_thread")
DETECTOR_CRITERIA = [n for n, row in policy.CRITERIA.items() if row.detector is not None]


def _ctx(pl, dead=()):
    """A resampling context on the hand-built SAE, with a tracker fed its inputs."""
    dead_F = torch.zeros(12, dtype=torch.bool)
    dead_F[list(dead)] = True
    tracker = FrequencyConsistencyTracker(TrackerConfig(enabled=True), 12, 16)
    for s in range(0, len(pl.x_ND), 100):
        tracker.update(pl.sae(pl.x_ND[s:s + 100]), pl.x_ND[s:s + 100])
    return ResampleContext(pl.sae, torch.optim.Adam(pl.sae.parameters()), pl.x_ND, dead_F, tracker, 7,
                           torch.Generator().manual_seed(0), torch.zeros(12, dtype=torch.long))


def test_table_rows_for_the_detectors_and_extract():
    assert DETECTOR_CRITERIA == ["siblings", "encdec", "coact", "coact_member"]
    assert all(policy.scored(n) and policy.CRITERIA[n].needs_tracker for n in DETECTOR_CRITERIA)
    assert "extract" in policy.OPERATIONS
    for crit in ("fc", *DETECTOR_CRITERIA):
        for op in ("split", "extract"):
            assert isinstance(policy.make_policy(SplitConfig(criterion=crit, operation=op)), SplitPolicy)
    with pytest.raises(FcsaeInputError, match="operation"):
        SplitConfig(operation="merge")
    with pytest.raises(FcsaeInputError, match="sibling_cos"):
        SplitConfig(sibling_cos=1.5)


def test_sibling_group_is_the_latent_and_its_decoder_neighbours():
    pl = absorbed_sae()
    assert sorted(sibling_group(pl.sae.W_dec, PARENT, 0.25)) == [PARENT] + ABSORBERS
    assert sibling_group(pl.sae.W_dec, ABSORBERS[0], 0.25)[1] == PARENT  # the parent shares most (0.71 vs 0.5)
    assert sibling_group(pl.sae.W_dec, CLEAN[0], 0.25) == [CLEAN[0]]


def test_coact_extract_gives_the_parent_back_its_inputs():
    pl = absorbed_sae("topk", k=2)
    cfg = SplitConfig(criterion="coact", operation="extract", rule="top_fraction", top_fraction=0.5, min_inputs=4)
    events = SplitPolicy(cfg)(_ctx(pl, dead=UNUSED))
    # One group: the parent and its three absorbers; the absorbers selected after it now have no siblings left.
    assert len(events) == 1
    ev = events[0]
    assert ev.kind == "extract" and ev.latent == PARENT and ev.partner == PARENT and ev.step == 7
    assert ev.group_sizes[0] == 3 and ev.score > 0.9
    with torch.no_grad():
        on = pl.sae.encode(pl.x_ND) > 1e-3
    assert bool(on[pl.kind_N >= 0, PARENT].all())  # no longer absorbed
    for j in ABSORBERS:
        assert torch.equal(on[:, j], pl.kind_N == j)


def test_extract_without_a_parent_recycles_the_partner():
    pl = absorbed_sae("topk", k=2, with_parent=False)
    cfg = SplitConfig(criterion="siblings", operation="extract", rule="top_fraction", top_fraction=0.2, min_inputs=4)
    ctx = _ctx(pl, dead=[PARENT] + UNUSED)
    events = SplitPolicy(cfg)(ctx)
    assert len(events) == 1 and events[0].latent in ABSORBERS and events[0].partner in [PARENT] + UNUSED
    assert events[0].group_sizes[0] == 3
    assert float(ctx.tracker.count_F[ABSORBERS + [events[0].partner]].abs().max()) == 0.0


def test_detector_split_uses_the_two_means_split():
    pl = absorbed_sae("topk", k=2)
    cfg = SplitConfig(criterion="encdec", operation="split", rule="top_fraction", top_fraction=0.1, min_inputs=4)
    events = SplitPolicy(cfg)(_ctx(pl, dead=UNUSED))
    assert [e.kind for e in events] == ["split"] and events[0].latent == PARENT  # the highest disagreement
    assert events[0].partner in UNUSED


def _toy_trainer(activation, split_cfg, steps=60):
    """A trainer on a small planted toy (2 groups of a parent and 3 children), not yet run."""
    from fcsae.toy import ToyConfig, make_toy
    from fcsae.trainer import Trainer

    toy = make_toy(ToyConfig(d=16, n_independent=4, n_groups=2, n_children=3, n_samples=4096), seed=0)
    tcfg = TrainerConfig(lr=2e-3, batch_size=256, total_tokens=256 * steps, resample_every=20, resample_until=0.7,
                         buffer_tokens=1024, dead_tokens=512, warmup_steps=5, log_every=10)
    groups = {"matryoshka_groups": "4,12,24"} if activation == "matryoshka" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=16, dict_size=24, activation=activation, k=3, **groups), seed=0)
    return Trainer(sae, tcfg, split_cfg, TrackerConfig(enabled=True)), toy


@pytest.mark.parametrize("criterion,operation,activation",
                         [(c, o, "topk") for c in ("fc", *DETECTOR_CRITERIA) for o in ("split", "extract")]
                         + [(c, o, a) for a in ("batchtopk", "matryoshka")
                            for c, o in (("fc", "extract"), ("encdec", "split"))])
def test_every_detector_and_operation_trains_end_to_end(criterion, operation, activation):
    from fcsae.toy import toy_batches

    split_cfg = SplitConfig(criterion=criterion, operation=operation, rule="top_fraction", top_fraction=0.1, min_inputs=4)
    trainer, toy = _toy_trainer(activation, split_cfg)
    events = trainer.fit(toy_batches(toy.x_ND, 256, 0))
    assert trainer.step == 60 and trainer.tracker is not None
    assert all(e.kind == operation and e.step in (20, 40) for e in events)
    assert 0 <= trainer.last_metrics["fvu"] < 1.0


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "matryoshka"])
def test_extract_events_on_a_trained_sae_of_every_architecture(activation):
    """One extract event on a toy SAE trained 100 steps: what each event says it wrote is what the SAE holds."""
    from fcsae.toy import toy_batches

    trainer, toy = _toy_trainer(activation, SplitConfig(), steps=200)
    batches = toy_batches(toy.x_ND, 256, 0)
    for _ in range(100):
        trainer.train_step(next(batches))
    sae = trainer.sae
    with torch.no_grad():
        before = {n: getattr(sae, n).detach().clone() for n in ("W_dec", "W_enc", "b_enc")}
    threshold = float(sae.threshold)
    ctx = ResampleContext(sae, trainer.optimizer, trainer.buffer_ND[:trainer.buffer_fill], trainer.dead_mask_F,
                          trainer.tracker, trainer.step, trainer.generator, trainer.tokens_since_fired_F)
    cfg = SplitConfig(criterion="siblings", operation="extract", rule="top_fraction", top_fraction=0.5, min_inputs=4)
    events = SplitPolicy(cfg)(ctx)
    assert events and all(e.kind == "extract" and e.siblings for e in events)
    touched = [i for e in events for i in dict.fromkeys([e.partner, *e.siblings])]
    assert len(touched) == len(set(touched))  # no latent is touched by two operations of one event
    with torch.no_grad():
        changed = ((sae.W_dec - before["W_dec"]).abs().amax(1) > 0) | ((sae.b_enc - before["b_enc"]).abs() > 0)
        assert sorted(changed.nonzero().flatten().tolist()) == sorted(touched)  # nothing else was written
        for e in events:
            u_D = sae.W_dec[e.partner]
            assert torch.allclose(sae.W_enc[:, e.partner], u_D) and float(sae.b_enc[e.partner]) == 0.0
            sib = list(e.siblings)
            assert torch.allclose(sae.W_dec[sib].norm(dim=1), torch.ones(len(sib)), atol=1e-5)
            assert float((sae.W_dec[sib] @ u_D).abs().max()) < 1e-4  # the shared component is gone from them
            if activation == "matryoshka":  # the shared latent sits in the earliest prefix of its group
                assert e.partner < min(sib)
    assert float(trainer.tracker.count_F[touched].abs().max()) == 0.0
    assert bool((trainer.tokens_since_fired_F[touched] == 0).all())
    assert float(sae.threshold) == threshold


def test_study_arm_space_validates():
    from pathlib import Path

    from orchestrator import space

    spec = space.load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "study-cpu-deabsorb.yaml")
    assert dict(spec.grid)["split.criterion"] == ("none", "encdec")
