"""The extract operation on a planted absorbed group: shared direction, new rows, reconstruction kept, resets."""

import pytest
import torch

from fcsae.config import TrackerConfig
from fcsae.extract import apply_extract, extract_plan, shared_direction
from fcsae.resample import ResampleContext
from fcsae.tracker import FrequencyConsistencyTracker
from tests._absorbed_sae import ABSORBERS, CLEAN, PARENT, UNUSED, absorbed_sae

CLEAN_AND_UNUSED_REST = CLEAN + UNUSED[1:]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_direction_is_the_common_factor():
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q.T
    a = torch.tensor([0.6, 0.7, 0.5, 0.8])
    rows = torch.stack([a[j] * Q[0] + (1 - a[j] ** 2).sqrt() * Q[j + 1] for j in range(4)])
    # With the parent's own row in the group the factor is exact; the top singular vector is tilted.
    assert float(shared_direction(torch.cat([rows, Q[:1]])) @ Q[0]) > 0.9999
    assert float(torch.linalg.svd(torch.cat([rows, Q[:1]])).Vh[0] @ Q[0]).__abs__() < 0.99
    # Without it, the parent lies partly outside the rows' span: only its projection there can be found.
    assert float(shared_direction(rows) @ Q[0]) > 0.85
    assert float(shared_direction(-rows) @ Q[0]) < -0.85  # signed along the rows


def test_plan_targets_the_parent_and_strips_the_children():
    pl = absorbed_sae()
    plan = extract_plan(pl.sae.W_dec, [PARENT] + ABSORBERS)
    p = pl.Q_DD[0]
    assert plan.target == PARENT and plan.siblings == ABSORBERS
    assert float(plan.u_D @ p) > 0.9999
    assert torch.allclose(plan.sib_dec_SD, pl.Q_DD[ABSORBERS], atol=1e-4)
    assert torch.allclose(plan.sib_scale_S, torch.full((3,), 2 ** -0.5), atol=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        extract_plan(pl.sae.W_dec, [PARENT])


def _recon_error(sae, x, train_forward=False):
    """Relative squared error of the inference code (``encode``), or of the training forward (batch selection)."""
    with torch.no_grad():
        recon = sae(x).recon_BD if train_forward else sae.decode(sae.encode(x))
        return float((recon - x).pow(2).sum(1).mean() / x.pow(2).sum(1).mean())


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("with_parent", [True, False])
def test_extract_keeps_the_reconstruction_of_the_affected_inputs(activation, with_parent):
    pl = absorbed_sae(activation, k=2, with_parent=with_parent)
    sae, x = pl.sae, pl.x_ND
    # Without a parent latent the parent-alone inputs were never reconstructed: the child inputs are the affected ones.
    affected = pl.kind_N >= (0 if with_parent else 1)
    before = _recon_error(sae, x[affected])
    group = ([PARENT] if with_parent else []) + ABSORBERS
    plan = extract_plan(sae.W_dec, group)
    target = plan.target if with_parent else UNUSED[0]
    assert (plan.target is None) == (not with_parent)
    opt = torch.optim.Adam(sae.parameters())
    sae(x).recon_BD.pow(2).sum().backward()
    opt.step()
    with torch.no_grad():  # undo the step, keep the moments: only the resets are under test
        pl2 = absorbed_sae(activation, k=2, with_parent=with_parent)
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, n).copy_(getattr(pl2.sae, n))
    threshold = float(sae.threshold)
    tracker = FrequencyConsistencyTracker(TrackerConfig(enabled=True), 12, 16)
    tracker.update(sae(x), x)
    since_F = torch.full((12,), 99)
    ctx = ResampleContext(sae, opt, x, torch.zeros(12, dtype=torch.bool), tracker, 0, torch.Generator(), since_F)
    touched = apply_extract(ctx, plan, target)
    shared, slots = touched[0], dict(zip(plan.siblings, touched[1:]))
    assert sorted(touched) == sorted([target] + ABSORBERS)
    # Matryoshka: the shared direction takes the earliest slot (latent 1, in the first prefix), absorber 1 moves to 10.
    moved = activation == "matryoshka" and not with_parent
    assert shared == (ABSORBERS[0] if moved else target)
    assert slots == ({1: UNUSED[0], 2: 2, 3: 3} if moved else {j: j for j in ABSORBERS})
    with torch.no_grad():
        assert torch.allclose(sae.W_dec[shared], plan.u_D) and torch.allclose(sae.W_enc[:, shared], plan.u_D)
        assert float(sae.b_enc[shared]) == 0.0 and float(sae.threshold) == threshold  # the inference threshold is kept
    after = _recon_error(sae, x[affected])
    assert before < 1e-6 and after < 1e-4  # the relative error of the affected inputs stays ~0
    assert _recon_error(sae, x[affected], train_forward=True) < 1e-4  # also under TopK's / the batch's selection
    assert _recon_error(sae, x[pl.kind_N < 0]) < 1e-4  # and the others are untouched
    with torch.no_grad():
        lat = sae.encode(x)
    on = lat > 1e-3
    assert bool(on[pl.kind_N >= 1, shared].all())  # the shared latent fires on the union of the group's inputs
    for j in ABSORBERS:  # each sibling still fires exactly where it did (at its new slot if it moved)
        assert torch.equal(on[:, slots[j]], pl.kind_N == j)
    for param, dim in ((sae.W_enc, 1), (sae.W_dec, 0)):
        m = opt.state[param]["exp_avg"]
        assert float(m.index_select(dim, torch.tensor(touched)).abs().max()) == 0.0
    assert float(tracker.count_F[touched].abs().max()) == 0.0
    assert since_F[touched].eq(0).all() and since_F[CLEAN_AND_UNUSED_REST].eq(99).all()


def test_matryoshka_extract_keeps_the_first_prefix_whole_for_the_unmoved_children():
    """The shared direction in the first prefix: that prefix still reconstructs children 2 and 3 exactly (each has
    its stripped sibling and the shared latent there); left at the recycled slot 10 it would lose the parent on all
    three."""
    errs = {}
    for placed in (True, False):
        pl = absorbed_sae("matryoshka", k=2, with_parent=False)
        ctx = ResampleContext(pl.sae, torch.optim.Adam(pl.sae.parameters()), pl.x_ND, torch.zeros(12, dtype=torch.bool),
                              None, 0, torch.Generator())
        plan = extract_plan(pl.sae.W_dec, ABSORBERS)
        if placed:
            apply_extract(ctx, plan, UNUSED[0])
        else:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("fcsae.extract.place_shared", lambda sae, t, sib: (t, list(sib)))
                apply_extract(ctx, plan, UNUSED[0])
        with torch.no_grad():
            first_ND = pl.sae(pl.x_ND).prefix_recons_BLD[:, 0]
        err_N = (first_ND - pl.x_ND).pow(2).sum(1) / pl.x_ND.pow(2).sum(1).clamp_min(1e-12)
        errs[placed] = {j: float(err_N[pl.kind_N == j].mean()) for j in ABSORBERS}
    assert errs[True][2] < 1e-4 and errs[True][3] < 1e-4 and errs[True][1] > 0.3  # only the moved child is outside
    assert all(errs[False][j] > 0.3 for j in ABSORBERS)  # without the placement every child loses its parent there
