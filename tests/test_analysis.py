"""fcsae.analysis: roles, absorbers by the eval's rule, tracker round trip from a saved SAE, snapshots, figures, toy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import polars as pl
import pytest
import torch

from fcsae import analysis
from fcsae.config import SAEConfig, SplitConfig, TrackerConfig, TrainerConfig
from fcsae.errors import FcsaeInputError
from fcsae.plotting import unlabelled_axes
from fcsae.sae import SparseAutoencoder
from fcsae.tracker import FrequencyConsistencyTracker
from fcsae.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_latent_roles_absorber_wins():
    roles = analysis.latent_roles(6, main=[1, 2, 5], absorbers=[2, 4])
    assert roles == ["other", "main", "absorber", "other", "absorber", "main"]
    with pytest.raises(FcsaeInputError, match="another SAE"):
        analysis.latent_roles(6, main=[6])


def test_main_latents_from_per_letter_table():
    per_letter = pl.DataFrame({"letter": ["a", "b", "c"], "main_latents": [[3], [5, 9], []]})
    assert analysis.main_latents(per_letter) == {3, 5, 9}
    assert analysis.main_latents(None) == set()


def _tied_relu_sae() -> SparseAutoencoder:
    """Latent 0 = e0 (the letter's main latent, needs x.e0 > 1 to fire), 1 = (e0+e1)/sqrt2, 2 = e2."""
    sae = SparseAutoencoder(SAEConfig(d_in=4, dict_size=3, activation="relu"))
    W_dec = torch.tensor([[1.0, 0, 0, 0], [2 ** -0.5, 2 ** -0.5, 0, 0], [0, 0, 1.0, 0]])
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.copy_(torch.tensor([-1.0, 0.0, 0.0]))
        sae.b_dec.zero_()
    return sae


def test_absorber_counts_follow_the_eval_rule():
    from fcsae.evals.probe import LETTERS, ProbeData

    sae = _tied_relu_sae()
    # 'a' words: weak along the probe (e0) and strong along e1, so main latent 0 stays silent and latent 1
    # (cos 0.71 with the probe) carries the probe direction: absorbed. 'b' words fire only the unrelated latent.
    acts = torch.tensor([[0.8, 2.0, 0, 0], [0.7, 1.5, 0, 0], [0.0, 0.0, 2.0, 0]])
    W = torch.zeros(len(LETTERS), 4)
    W[0, 0] = 1.0
    W[1, 2] = 1.0
    data = ProbeData(acts, acts, torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), ["x", "y", "z"], W,
                     torch.full((len(LETTERS),), -0.5), [{"f1": 1.0}] * len(LETTERS))
    per_letter = pl.DataFrame({"letter": ["a", "b"], "main_latents": [[0], [2]]})
    counts = analysis.absorber_counts(sae, data, per_letter, norm_scale=1.0)
    assert counts == {1: 2}


def _trained_tracker_trainer(steps: int = 12, every: int = 4) -> Trainer:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, dict_size=16, activation="topk", k=2), seed=0)
    cfg = TrainerConfig(batch_size=32, total_tokens=32 * steps, warmup_steps=2, log_every=1, seed=0, buffer_tokens=64)
    return Trainer(sae, cfg, SplitConfig(), TrackerConfig(enabled=True))


def _batches(n: int = 64, d: int = 8):
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(n // 2, d, generator=g)


def test_snapshots_record_quantiles_and_resume(tmp_path):
    trainer = _trained_tracker_trainer(steps=12)
    path = tmp_path / "snaps.jsonl"
    trainer.fit(_batches(), callbacks=[analysis.TrackerSnapshots(path, trainer, every=4, top=3)])
    snaps = analysis.read_snapshots(path)
    assert snaps["step"].to_list() == [4, 8, 12]
    for r in snaps.iter_rows(named=True):
        assert r["score_q50"] <= r["score_q90"] <= r["score_q99"] <= r["score_q100"]
        assert len(r["top_latents"]) == 3 and r["top_scores"][0] == pytest.approx(r["score_q100"], rel=1e-5)
    # A resumed run at step 8 keeps the snapshots up to 8 and replaces the later ones.
    trainer.step = 8
    again = analysis.TrackerSnapshots(path, trainer, every=4)
    assert [r["step"] for r in again.rows] == [4, 8]
    with pytest.raises(FcsaeInputError, match="no tracker"):
        analysis.TrackerSnapshots(path, Trainer(SparseAutoencoder(SAEConfig(d_in=8, dict_size=16, k=2)), TrainerConfig()))


def test_read_snapshots_refuses_a_bad_file(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(FcsaeInputError, match="bad.jsonl"):
        analysis.read_snapshots(tmp_path / "bad.jsonl")


def _saved_run(tmp_path: Path) -> tuple[Path, FrequencyConsistencyTracker]:
    trainer = _trained_tracker_trainer(steps=6)
    trainer.fit(_batches())
    run = tmp_path / "run"
    extra = {f"tracker.{k}": v for k, v in trainer.tracker.state_dict().items()}
    trainer.sae.save(run / "sae", extra_tensors=extra)
    tcfg = TrackerConfig(enabled=True, consistency="seed")
    (run / "train.json").write_text(json.dumps({"tracker": {**tcfg.__dict__}, "trainer": {"batch_size": 32}}))
    (run / "events.jsonl").write_text(json.dumps({"step": 3, "kind": "split", "latent": 1}) + "\n")
    return run, trainer.tracker


def test_load_tracked_sae_restores_the_tracker(tmp_path):
    run, original = _saved_run(tmp_path)
    t = analysis.load_tracked_sae(run / "sae")
    assert t.tracker_cfg.consistency == "seed"  # from train.json, not the default
    got, want = t.tracker.scores(), original.scores()
    assert torch.equal(got.freq_F, want.freq_F) and torch.equal(got.count_F, want.count_F)
    # The saved config's consistency definition is the one applied.
    assert not torch.allclose(got.consistency_F, want.consistency_F)
    SparseAutoencoder(SAEConfig(d_in=8, dict_size=16, k=2)).save(tmp_path / "plain")
    with pytest.raises(FcsaeInputError, match="no tracker state"):
        analysis.load_tracked_sae(tmp_path / "plain")


def test_figures_have_labelled_axes_and_are_written(tmp_path):
    run, _ = _saved_run(tmp_path)
    trainer = _trained_tracker_trainer(steps=8)
    snaps_path = tmp_path / "s.jsonl"
    trainer.fit(_batches(), callbacks=[analysis.TrackerSnapshots(snaps_path, trainer, every=2)])
    table = analysis.latent_table(trainer.tracker.scores(), analysis.latent_roles(16, [0, 1], [2]))
    assert table.height == 16 and set(table["role"]) == {"main", "absorber", "other"}
    figs = [analysis.fc_scatter_figure(table), analysis.score_distribution_figure(table),
            analysis.score_evolution_figure(analysis.read_snapshots(snaps_path), 32, [{"step": 3, "kind": "split"}])]
    for fig in figs:
        assert unlabelled_axes(fig) == [] and fig.axes[0].get_legend() is not None
        plt.close(fig)
    per_letter = pl.DataFrame({"letter": ["a"], "main_latents": [[0, 3]]})
    paths = analysis.analyse_sae(run / "sae", tmp_path / "out", per_letter, absorbers=[5], snapshots=snaps_path)
    assert [p.name for p in paths] == ["fc_scatter.png", "score_distribution.png", "score_evolution.png"]
    for p in paths:
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5_000
    latents = pl.read_csv(tmp_path / "out" / "latents.csv")
    assert latents.filter(pl.col("role") == "main")["latent"].to_list() == [0, 3]
    assert latents.filter(pl.col("role") == "absorber")["latent"].to_list() == [5]


def test_cli_sae_and_bad_input(tmp_path, capsys):
    run, _ = _saved_run(tmp_path)
    assert analysis.main(["sae", str(run / "sae"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "fc_scatter.png").exists()
    assert analysis.main(["sae", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "fcsae.analysis: error:" in capsys.readouterr().err
    (tmp_path / "l.parquet").write_text("junk")
    assert analysis.main(["sae", str(run / "sae"), "--letters", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "o3")]) == 2
    assert "--letters:" in capsys.readouterr().err


def test_toy_run_labels_latents_by_ground_truth():
    toy = pytest.importorskip("fcsae.toy")
    cfg = toy.ToyConfig(n_samples=4096)
    res = analysis.run_toy("fc", steps=40, dict_size=32, k=4, batch_size=256, snapshot_every=10, toy_cfg=cfg)
    assert res.table.height == 32
    n_main = res.table.filter(pl.col("role") == "main").height
    n_abs = res.table.filter(pl.col("role") == "absorber").height
    assert n_abs == int(res.absorption["n_absorbers"])
    assert 0 < n_main + n_abs <= cfg.n_groups + 32  # parents that got a latent, plus the absorbers found
    assert res.snapshots["step"].to_list() == [10, 20, 30, 40]
    assert all(math.isfinite(v) for v in res.table["score"].to_list())
    from fcsae.detectors import DETECTORS

    assert set(DETECTORS) <= set(res.table.columns)  # one column per detector, per latent
    assert set(res.detection) == {f"{t}.{d}" for t in ("absorbers", "parents") for d in DETECTORS}
    summary = analysis.detection_summary([res, res])
    assert summary.height == 2 * len(DETECTORS) and set(summary["n"].to_list()) <= {0, 2}
    both = summary.filter(pl.col("n") == 2)
    assert (both["std"].abs() < 1e-9).all() and ((both["mean"] >= 0) & (both["mean"] <= 1)).all()


def test_absorbed_parents_and_auroc():
    from types import SimpleNamespace

    res = SimpleNamespace(per_parent=[{"latent": 2, "absorption": 0.5}, {"latent": 0, "absorption": 0.05},
                                      {"latent": -1, "absorption": 0.9}])
    assert analysis.absorbed_parents(res, 4).tolist() == [False, False, True, False]
    pos = torch.tensor([False, True, True, False])
    assert analysis.auroc(torch.tensor([0.1, 0.9, 0.8, 0.2]), pos, torch.ones(4, dtype=torch.bool)) == 1.0
    assert analysis.auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), pos, torch.ones(4, dtype=torch.bool)) == 0.5
    assert math.isnan(analysis.auroc(torch.ones(4), pos, ~pos))


@pytest.mark.slow
def test_absorbers_agree_with_the_eval_on_a_tiny_model(tmp_path, monkeypatch):
    """On the real eval path (tiny random model): absorbers exist exactly for letters the eval scores as absorbed."""
    from fcsae.config import EvalConfig, LMConfig
    from fcsae.evals import absorption
    from fcsae.lm import make_tiny_model
    from tests._evals_utils import DenseSAE

    monkeypatch.setenv("FCSAE_HOME", str(tmp_path))
    lm = make_tiny_model("llama", d_model=32, n_layers=2)
    lmc = LMConfig(model="tiny", layer=1)
    cfg = EvalConfig(absorption_words=120, icl_examples=3, icl_prefixes=4, probe_f1_min=0.0, max_k=3, batch_size=2)
    g = torch.Generator().manual_seed(0)
    sae = DenseSAE(torch.randn(32, 48, generator=g), torch.randn(48, 32, generator=g), relu=True)
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)  # fcsae SAEs keep unit decoder rows
    res = absorption.evaluate_absorption(sae, lmc, cfg, 1.0, lm=lm, progress=False)
    counts = analysis.absorbers_from_eval(sae, lmc, cfg, 1.0, res.per_letter, lm=lm)
    absorbed = res.per_letter.filter(pl.col("mean_absorption_fraction") > 0)
    assert absorbed.height > 0 and bool(counts)  # a random SAE absorbs: the check below is not vacuous
    assert all(0 <= i < 48 for i in counts)
    for row in res.per_letter.iter_rows(named=True):
        one = analysis.absorber_counts(sae, absorption.prepare_absorption_cache(lmc, cfg, lm=lm, progress=False),
                                       pl.DataFrame([row]), 1.0)
        assert not set(one) & set(row["main_latents"])  # a letter's main latents never absorb it
        assert bool(one) == ((row["mean_absorption_fraction"] or 0) > 0)
