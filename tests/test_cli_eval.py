"""`fcsae eval` on a sweep trial uses that trial's eval settings (the ones its result row was measured with)."""

from __future__ import annotations

from pathlib import Path

from fcsae.cli import _sae_dir, trial_eval_settings
from results_schema.store import write_trial


def _trial(exp: Path, tid: str = "t1") -> Path:
    sae = exp / "trials" / tid / "sae"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text("{}")
    write_trial(exp / "results", {"trial_id": tid, "status": "ok", "eval.core_tokens": 4096,
                                  "eval.absorption_words": 2000, "eval.context_len": 128})
    return sae


def test_trial_settings_come_from_its_row(tmp_path):
    sae = _trial(tmp_path / "exp")
    assert _sae_dir(sae.parent) == sae  # the trial directory itself is accepted
    settings, trial = trial_eval_settings(sae)
    assert trial == "t1"
    assert settings["core_tokens"] == 4096 and settings["absorption_words"] == 2000 and settings["context_len"] == 128
    assert "corpus" not in settings  # null in the row: left to EvalConfig's default


def test_outside_a_sweep_there_are_no_trial_settings(tmp_path):
    sae = tmp_path / "runs" / "x" / "sae"
    sae.mkdir(parents=True)
    assert trial_eval_settings(sae) == ({}, None)
    other = _trial(tmp_path / "exp2", "t2")
    (tmp_path / "exp2" / "results" / "t2.parquet").unlink()  # trial without a row (still running)
    assert trial_eval_settings(other) == ({}, None)


def test_log_lines_go_around_progress_bars(monkeypatch):
    """While a command runs, the console log handler writes through tqdm (above a bar, never glued onto it)."""
    import logging

    from tqdm.contrib.logging import _TqdmLoggingHandler

    from fcsae import cli

    seen = []
    monkeypatch.setattr(cli, "_run_query", lambda args: seen.extend(type(h) for h in logging.getLogger().handlers) or 0)
    logging.getLogger().addHandler(logging.StreamHandler())  # as basicConfig would have installed
    try:
        assert cli.main(["query", "--list"]) == 0
    finally:
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if type(h) is not logging.StreamHandler]
    assert _TqdmLoggingHandler in seen
