"""Planted-absorption toy: the generator's ground truth and the absorption measure on hand-built dictionaries."""

import pytest
import torch

from fcsae.errors import FcsaeInputError
from fcsae.toy import ToyConfig, make_toy, measure_absorption

CFG = ToyConfig(d=48, n_independent=10, p_independent=0.05, n_groups=3, n_children=4, p_group=0.3,
                p_parent_alone=0.1, magnitude_std=0.0, noise=0.01, n_samples=6000)


def test_deterministic_given_seed():
    a, b, c = make_toy(CFG, seed=1), make_toy(CFG, seed=1), make_toy(CFG, seed=2)
    assert torch.equal(a.x_ND, b.x_ND) and torch.equal(a.labels_NG, b.labels_NG)
    assert not torch.equal(a.x_ND, c.x_ND)


def test_hierarchy_frequencies_and_scale():
    toy = make_toy(CFG, seed=0)
    lab = toy.labels_NG
    assert toy.x_ND.norm(dim=1).mean() == pytest.approx(CFG.d ** 0.5, rel=1e-4)
    torch.testing.assert_close(toy.features_GD @ toy.features_GD.T, torch.eye(CFG.n_features), atol=1e-5, rtol=0)
    n = CFG.n_samples
    tol = 4 * (0.25 / n) ** 0.5  # four binomial standard deviations at worst
    for p, kids in zip(toy.parents, toy.children):
        any_child = lab[:, kids].any(1)
        assert (lab[:, kids].sum(1) <= 1).all()  # children are exclusive
        assert (lab[any_child, p]).all()  # the parent fires whenever a child fires
        assert float(any_child.float().mean()) == pytest.approx(CFG.p_group, abs=tol)
        alone = lab[:, p] & ~any_child
        assert float(alone.float().mean()) == pytest.approx((1 - CFG.p_group) * CFG.p_parent_alone, abs=tol)
        assert (toy.parent_of_G[kids] == p).all()
    assert float(lab[:, :CFG.n_independent].float().mean()) == pytest.approx(CFG.p_independent, abs=tol)
    # Without noise and magnitude spread, each sample is exactly its features (times the scale).
    clean = make_toy(ToyConfig(**{**CFG.__dict__, "noise": 0.0}), seed=0)
    torch.testing.assert_close(clean.x_ND, clean.norm_scale * clean.labels_NG.float() @ clean.features_GD,
                               atol=1e-5, rtol=0)


class LinearSAE:
    """A hand-built dictionary: relu(x @ W_enc + b_enc), decoder rows W_dec."""

    def __init__(self, W_enc_DL, b_enc_L, W_dec_LD):
        self.W_enc, self.b_enc, self.W_dec = W_enc_DL, b_enc_L, W_dec_LD

    def encode(self, x_BD):
        return torch.relu(x_BD @ self.W_enc + self.b_enc)


def clean_dictionary(toy):
    f = toy.features_GD
    return LinearSAE(f.T.clone(), torch.full((f.shape[0],), -0.5 * toy.norm_scale), f.clone())


def absorbing_dictionary(toy, absorbed_groups):
    """Children of the given groups decode child + parent; their parent fires only when no child does."""
    sae = clean_dictionary(toy)
    for gi in absorbed_groups:
        p, kids = toy.parents[gi], toy.children[gi]
        f = toy.features_GD
        sae.W_enc[:, p] = f[p] - 2 * f[kids].sum(0)
        for c in kids:
            d = f[c] + f[p]
            sae.W_dec[c] = d / d.norm()
    return sae


def test_clean_dictionary_has_no_absorption():
    toy = make_toy(CFG, seed=0)
    res = measure_absorption(clean_dictionary(toy), toy)
    assert res.summary["absorption"] == 0.0
    assert res.summary["parent_recall"] == 1.0
    assert res.summary["parent_cos"] == pytest.approx(1.0, abs=1e-5)
    assert not res.absorber_L.any()


def test_planted_absorption_is_measured_exactly():
    toy = make_toy(CFG, seed=0)
    res = measure_absorption(absorbing_dictionary(toy, [0, 2]), toy)
    lab = toy.labels_NG
    for gi, row in enumerate(res.per_parent):
        p, kids = toy.parents[gi], toy.children[gi]
        assert row["latent"] == p  # the parent latent is the parent's own, not a child absorber
        with_child = lab[:, kids].any(1)
        expect = int(with_child.sum()) / int(lab[:, p].sum()) if gi in (0, 2) else 0.0
        assert row["absorption"] == pytest.approx(expect, abs=1e-9)
        assert row["recall"] == pytest.approx(1.0 - expect, abs=1e-9)
    absorbers = set(res.absorber_L.nonzero().flatten().tolist())
    assert absorbers == set(toy.children[0] + toy.children[2])
    assert res.summary["n_absorbers"] == 8


def test_bad_toy_config_is_input_error():
    with pytest.raises(FcsaeInputError, match="p_group"):
        ToyConfig(p_group=1.5)
    with pytest.raises(FcsaeInputError, match="noise"):
        ToyConfig(noise=-1.0)


def test_sample_seed_keeps_features_and_draws_new_samples():
    a, b = make_toy(CFG, seed=1), make_toy(CFG, seed=1, sample_seed=9)
    assert torch.equal(a.features_GD, b.features_GD)
    assert not torch.equal(a.labels_NG, b.labels_NG)
    assert b.norm_scale == pytest.approx(a.norm_scale, rel=0.02)
