"""The real trial runner on a tiny random model (no Ray): prepare once, train with reports, evaluate, resume."""

from pathlib import Path

import pytest

from orchestrator import fcsae_runner, space
from orchestrator.trainable import TrialContext, base_row, outcome_row
from results_schema import reader, store
from tests._evals_utils import write_text_corpus


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    from fcsae.lm import make_tiny_model, save_model

    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))
    model_dir = save_model(make_tiny_model("gpt_neox", d_model=32, n_layers=2), tmp_path / "tiny-model")
    text = write_text_corpus(tmp_path / "corpus.txt", n_paragraphs=300)
    raw = {
        "name": "tiny",
        "fixed": {
            "lm": {"model": str(model_dir), "layer": 1},
            "harvest": {"corpus": text, "tokens": 2048, "context_len": 16, "batch_size": 8, "shard_tokens": 1024},
            "sae": {"activation": "topk", "k": 4, "dict_size": 64},
            "trainer": {"total_tokens": 25 * 64, "batch_size": 64, "warmup_steps": 2, "log_every": 2,
                        "resample_every": 5, "dead_tokens": 256, "buffer_tokens": 512},
            "eval": {"corpus": text, "core_tokens": 256, "context_len": 16, "batch_size": 4, "kl_topk": 8},
        },
        "evals": {"core": True, "absorption": False},
        "search": {"split.criterion": {"type": "categorical", "values": ["dead", "fc"], "grid": True}},
        "objectives": [{"metric": "core.explained_variance", "mode": "max"}],
        "num_samples": 2,
    }
    return space.parse_space(raw), tmp_path


@pytest.mark.slow
def test_prepare_run_resume_and_row(tiny_setup):
    spec, tmp = tiny_setup
    shared = fcsae_runner.prepare(spec)
    assert shared["d_in"] == 32 and shared["norm_scale"] > 0 and Path(shared["cache_path"]).is_dir()
    reports = []
    trial_dir = tmp / "exp" / "trials" / "t1"
    trial_dir.mkdir(parents=True)
    ctx = TrialContext(spec, shared, "t1", {"split.criterion": "fc"}, trial_dir,
                       lambda m, ckpt: reports.append((dict(m), ckpt)))
    out = fcsae_runner.run(ctx)
    # interim reports: every log step, the checkpointing ones flagged, each with the trainer's metrics
    steps = [int(m["step"]) for m, _ in reports]
    assert steps == sorted(steps) and steps[-1] == 25
    assert all("fvu" in m for m, _ in reports)
    assert reports[-1][1] and any(ck for _, ck in reports[:-1])
    assert out.tokens_trained == 25 * 64 and out.configs["split"].criterion == "fc"
    assert out.configs["trainer"].checkpoint_every % 2 == 0  # aligned with log_every
    assert -1.0 < out.metrics["core.explained_variance"] <= 1.0
    assert (trial_dir / "sae" / "cfg.json").exists() and (trial_dir / "events.jsonl").exists()
    assert out.n_split_events + out.n_resample_events == len((trial_dir / "events.jsonl").read_text().splitlines())

    # a second run of the same trial resumes from its final checkpoint: no training, same SAE
    reports.clear()
    again = fcsae_runner.run(ctx)
    assert not reports
    assert again.metrics["core.explained_variance"] == pytest.approx(out.metrics["core.explained_variance"])

    row = base_row(spec, "sweep", "t1", ctx.params, trial_dir, started=None)
    row.update(outcome_row(spec, out))
    store.write_trial(tmp / "exp" / "results", row, per_letter=out.per_letter)
    df = reader.scan_results(tmp / "exp" / "results").collect()
    assert df["status"][0] == "ok" and df["sae.d_in"][0] == 32 and df["split.criterion"][0] == "fc"
    assert df["objective"][0] == pytest.approx(out.metrics["core.explained_variance"])
