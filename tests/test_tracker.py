"""FrequencyConsistencyTracker against a brute-force computation on small random data."""

from typing import NamedTuple

import pytest
import torch

from fcsae.config import TrackerConfig
from fcsae.errors import FcsaeInputError
from fcsae.sae import _Layout
from fcsae.tracker import FrequencyConsistencyTracker


class Out(NamedTuple):
    """Stand-in with the field names of ``fcsae.sae.ForwardOutput`` (the tracker reads only these)."""

    recon_BD: torch.Tensor | None
    acts_BK: torch.Tensor | None
    idx_BK: torch.Tensor | None
    latents_BF: torch.Tensor | None


class LayoutOut(NamedTuple):
    """A fast-path output: the pairs also come sorted by latent (``ForwardOutput.layout``)."""

    recon_BD: torch.Tensor | None
    acts_BK: torch.Tensor | None
    idx_BK: torch.Tensor | None
    latents_BF: torch.Tensor | None
    layout: _Layout


def topk_out(latents_BF: torch.Tensor, k: int) -> Out:
    vals, idx = latents_BF.topk(k, dim=1)
    return Out(None, vals.relu(), idx, None)


def dense_from(out: Out, F: int) -> torch.Tensor:
    if out.latents_BF is not None:
        return out.latents_BF
    dense = torch.zeros(out.acts_BK.shape[0], F)
    return dense.scatter(1, out.idx_BK, out.acts_BK)


def brute_force(batches, cfg: TrackerConfig, F: int, D: int):
    """Direct per-latent lists of (weight, input, age) and the formulas of docs/method.md."""
    a = cfg.ema_alpha
    freq = torch.zeros(F, dtype=torch.float64)
    entries = [[] for _ in range(F)]
    all_x = []
    n = cfg.stats_every
    last = (len(batches) // n) * n - 1  # the last batch the sums took
    for t, (out, x) in enumerate(batches):
        lat = dense_from(out, F).double()
        active = lat.abs() > cfg.tau_act
        freq = a * freq + (1 - a) * active.double().mean(0)
        all_x.append(x.double())
        if (t + 1) % n:
            continue
        for i in range(F):
            for b in range(x.shape[0]):
                if active[b, i]:
                    w = float(lat[b, i]) if cfg.weighting == "activation" else 1.0
                    entries[i].append((w, x[b].double(), t))
    T = len(batches)
    freq = freq / (1 - a ** T)
    m = torch.cat(all_x).mean(0)
    c = torch.ones(F, dtype=torch.float64)
    counts = torch.zeros(F, dtype=torch.float64)
    for i in range(F):
        if not entries[i]:
            continue
        decay = [(a ** (last - t)) if cfg.horizon == "ema" else 1.0 for _, _, t in entries[i]]
        w = torch.tensor([e[0] * d for e, d in zip(entries[i], decay)], dtype=torch.float64)
        xc = torch.stack([e[1] for e in entries[i]]) - m
        counts[i] = sum(decay)
        mu = (w[:, None] * xc).sum(0) / w.sum()
        e_sq = (w * xc.pow(2).sum(1)).sum() / w.sum()
        trace = (w * (xc - mu).pow(2).sum(1)).sum() / w.sum()
        if cfg.consistency == "normalized":
            c[i] = mu.pow(2).sum() / e_sq if e_sq > 0 else 1.0
        else:
            c[i] = 1.0 / (1.0 + trace / D)
    return freq, c, freq * (1 - c), counts


def random_batches(kind: str, T=4, B=9, F=6, D=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        x = torch.randn(B, D, generator=g) + 0.5
        lat = torch.randn(B, F, generator=g).relu()
        lat[:, -1] = 0.0  # one latent never fires
        if kind == "relu":
            o = Out(None, None, None, lat)
        else:
            o = topk_out(lat, k)
            if kind == "topk_layout":
                o = LayoutOut(*o, _Layout(o.idx_BK, F))
        out.append((o, x))
    return out


@pytest.mark.parametrize("kind", ["topk", "topk_layout", "relu"])
@pytest.mark.parametrize("consistency", ["normalized", "seed"])
@pytest.mark.parametrize("horizon,weighting,tau,every", [("ema", "count", 0.0, 1), ("all", "count", 0.3, 1),
                                                         ("ema", "activation", 0.5, 1), ("all", "activation", 0.0, 1),
                                                         ("ema", "count", 0.0, 2), ("all", "activation", 0.3, 3)])
def test_matches_brute_force(kind, consistency, horizon, weighting, tau, every):
    F, D = 6, 5
    cfg = TrackerConfig(ema_alpha=0.7, tau_act=tau, consistency=consistency, horizon=horizon, weighting=weighting,
                        stats_every=every)
    batches = random_batches(kind, T=7, F=F, D=D)
    tr = FrequencyConsistencyTracker(cfg, F, D)
    for out, x in batches:
        tr.update(out, x)
    got = tr.scores()
    freq, c, s, counts = brute_force(batches, cfg, F, D)
    torch.testing.assert_close(got.freq_F.double(), freq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.consistency_F.double(), c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.score_F.double(), s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.count_F.double(), counts, rtol=1e-5, atol=1e-6)
    # The never-firing latent: no frequency, consistency defaults to 1, score 0.
    assert got.freq_F[-1] == 0 and got.consistency_F[-1] == 1 and got.score_F[-1] == 0
    assert ((got.consistency_F >= 0) & (got.consistency_F <= 1)).all()


def test_tau_act_threshold_is_strict():
    cfg = TrackerConfig(tau_act=0.5, ema_alpha=0.5)
    tr = FrequencyConsistencyTracker(cfg, 3, 2)
    lat = torch.tensor([[0.5, 0.51, 0.0], [0.2, 2.0, 0.0]])
    tr.update(Out(None, None, None, lat), torch.randn(2, 2))
    # latent 0 reaches exactly tau on one input: not active; latent 1 active on both.
    assert tr.scores().freq_F.tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert tr.count_F.tolist() == [0.0, 2.0, 0.0]


def test_consistency_extremes():
    D = 4
    tr = FrequencyConsistencyTracker(TrackerConfig(), 2, D)
    g = torch.Generator().manual_seed(1)
    direction = torch.tensor([3.0, 0, 0, 0])
    for _ in range(5):
        # latent 0 sees the same input every time (+ background data centred at 0); latent 1 sees random inputs.
        x = torch.cat([direction[None], torch.randn(7, D, generator=g) * 2, -direction[None]])
        lat = torch.zeros(9, 2)
        lat[0, 0] = 1.0
        lat[1:8, 1] = 1.0
        tr.update(Out(None, None, None, lat), x)
    sc = tr.scores()
    assert sc.consistency_F[0] > 0.9  # identical inputs, far from the data mean
    assert sc.consistency_F[1] < 0.5  # diverse inputs around the data mean
    assert sc.score_F[1] > sc.score_F[0]


def test_reset_and_state_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = TrackerConfig(ema_alpha=0.8)
    batches = random_batches("topk", T=3, seed=3)
    tr = FrequencyConsistencyTracker(cfg, 6, 5)
    for out, x in batches:
        tr.update(out, x)
    save_file(tr.state_dict(), tmp_path / "t.safetensors")
    tr2 = FrequencyConsistencyTracker(cfg, 6, 5)
    tr2.load_state_dict(load_file(tmp_path / "t.safetensors"))
    for a, b in zip(tr.scores(), tr2.scores()):
        torch.testing.assert_close(a, b)
    # Continuing both gives identical results (exact resume).
    more = random_batches("topk", T=2, seed=4)
    for out, x in more:
        tr.update(out, x)
        tr2.update(out, x)
    for a, b in zip(tr.scores(), tr2.scores()):
        torch.testing.assert_close(a, b)

    before = tr.scores()
    tr.reset([1, 3])
    after = tr.scores()
    assert after.freq_F[[1, 3]].tolist() == [0, 0] and after.count_F[[1, 3]].tolist() == [0, 0]
    keep = [0, 2, 4, 5]
    torch.testing.assert_close(after.score_F[keep], before.score_F[keep])
    assert tr.sum_FD[[1, 3]].abs().sum() == 0
    # After a reset the frequency is bias-corrected from the latent's own first update.
    out, x = random_batches("topk", T=1, seed=5)[0]
    tr.update(out, x)
    expect = (dense_from(out, 6)[:, 1] > 0).float().mean()
    assert tr.scores().freq_F[1] == pytest.approx(float(expect), abs=1e-6)


def test_state_shape_mismatch_is_input_error():
    tr = FrequencyConsistencyTracker(TrackerConfig(), 6, 5)
    sd = FrequencyConsistencyTracker(TrackerConfig(), 7, 5).state_dict()
    before = tr.state_dict()
    with pytest.raises(FcsaeInputError, match="dict_size=6"):
        tr.load_state_dict(sd)
    for name, t in tr.state_dict().items():
        torch.testing.assert_close(t, before[name])
    with pytest.raises(FcsaeInputError, match="missing"):
        tr.load_state_dict({})


def update_allocations(tr, out, x) -> int:
    """Bytes allocated by one ``update`` (sum over ops: an upper bound on its peak temporary memory)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tr.update(out, x)
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.key_averages())


def test_state_and_update_memory_independent_of_dict_times_batch():
    F, D, k = 4096, 64, 32
    shapes = []
    for B in (8, 2048):
        tr = FrequencyConsistencyTracker(TrackerConfig(), F, D)
        x, idx = torch.randn(B, D), torch.randint(0, F, (B, k))
        out = Out(None, torch.rand(B, k) + 0.1, idx, None)
        tr.update(out, x)
        shapes.append({n: t.shape for n, t in tr.state_dict().items()})
        allocated = update_allocations(tr, out, x)
        # A [B, F, D] float tensor would be B*F*D*4 bytes (2 GiB at B=2048); even the naive gather of the
        # B*k active inputs ([B*k, D] floats) is more than twice what the update allocates.
        if B == 2048:
            assert allocated < 0.5 * B * k * D * 4
            assert allocated < 1e-2 * B * F * D * 4
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("kwargs,field", [({"ema_alpha": 1.0}, "ema_alpha"), ({"ema_alpha": 0.0}, "ema_alpha"),
                                          ({"ema_alpha": -0.5}, "ema_alpha"), ({"tau_act": -0.1}, "tau_act"),
                                          ({"consistency": "cosine"}, "consistency"), ({"horizon": "window"}, "horizon"),
                                          ({"weighting": "l2"}, "weighting"), ({"stats_every": 0}, "stats_every")])
def test_bad_config_is_input_error(kwargs, field):
    with pytest.raises(FcsaeInputError, match=field):
        TrackerConfig(**kwargs)


def test_wrong_width_is_input_error():
    tr = FrequencyConsistencyTracker(TrackerConfig(), 6, 5)
    with pytest.raises(FcsaeInputError, match="d_in=5"):
        tr.update(Out(None, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), None), torch.randn(2, 4))


@pytest.mark.parametrize("section,body,field", [
    ("tracker", "ema_alpha: 1.5", "tracker.ema_alpha"), ("tracker", "tau_act: -1", "tracker.tau_act"),
    ("tracker", "consistency: cosine", "tracker.consistency"), ("split", "criterion: entropy", "split.criterion"),
])
def test_cli_train_bad_tracker_or_split_config_exits_2(tmp_path, capsys, section, body, field):
    from fcsae.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"{section}:\n  {body}\n")
    out = tmp_path / "run"
    assert main(["train", "--cache", str(tmp_path / "no-cache"), "--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fcsae: error: ") and field in err[0]
    assert not out.exists()
