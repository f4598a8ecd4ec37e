"""Sweeps end to end with the fake runner: rows, failures, resume after SIGKILL, Ctrl-C, leftover processes.

Ray tests are ``slow``; the in-process ones share one small local Ray cluster
(session fixture); the kill/interrupt tests run the driver as a subprocess
with its own cluster, as a user would.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fcsae.errors import FcsaeInputError
from orchestrator import driver, ray_state, space
from results_schema import reader, schema

REPO = Path(__file__).resolve().parents[2]
SWEEP_BIN = REPO / ".venv" / "bin" / "fcsae-sweep"

SPACE = {
    "name": "fake",
    "runner": "tests.orchestrator.fake_runner",
    "fixed": {"sae": {"activation": "topk", "k": 4, "dict_size": 32}, "trainer": {"total_tokens": 2560, "batch_size": 256}},
    "search": {
        "split.criterion": {"type": "categorical", "values": ["none", "fc"], "grid": True},
        "tracker.ema_alpha": {"type": "float", "low": 0.9, "high": 0.999},
    },
    "objectives": [{"metric": "absorption.mean_absorption_fraction", "mode": "min"}],
    "num_samples": 4,
    "max_concurrent": 2,
    "resources": {"cpu": 1},
}


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray for the in-process sweep tests."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(**changes):
    raw = copy.deepcopy(SPACE)
    raw.update(changes)
    return space.parse_space(raw)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
def test_sweep_end_to_end_writes_schema_valid_rows(tmp_path, ray_cluster):
    exp = tmp_path / "exp"
    outcome = driver.run_sweep(_spec(), exp, live=False)
    assert outcome.complete and outcome.counts["ok"] == 4
    df = reader.scan_results(exp / "results").collect()
    assert df.height == 4 and df["trial_id"].n_unique() == 4
    assert set(df["schema_version"]) == {schema.SCHEMA_VERSION}
    assert df.columns == schema.TRIAL_SCHEMA.names
    assert sorted(df["split.criterion"]) == ["fc", "fc", "none", "none"]  # grid cells get equal budgets
    assert all(0.9 <= a <= 0.999 for a in df["tracker.ema_alpha"])
    assert df["objective"].to_list() == df["absorption.mean_absorption_fraction"].to_list()
    assert all(json.loads(x) == {"absorption.not_in_schema": 1.5} for x in df["extra_metrics_json"])
    assert all(Path(d).is_dir() and str(exp) in d for d in df["trial_dir"])
    assert reader.scan_per_letter(exp / "results").collect().height == 8
    assert sorted(_lines(exp / "fake_completions.log")) == sorted(df["trial_id"])
    assert (exp / "sweep.json").exists() and not (exp / "ray_pids.json").exists()
    # Each trial's training checkpoint is deleted once its row is written (--keep-checkpoints keeps them).
    assert not any((Path(d) / "checkpoint").exists() for d in df["trial_dir"])
    assert all((Path(d) / "params.json").exists() for d in df["trial_dir"])


@pytest.mark.slow
def test_failing_trials_recorded_while_others_finish(tmp_path, ray_cluster, capsys):
    (tmp_path / "fake.json").write_text(json.dumps({"fail": "fc"}))
    exp = tmp_path / "exp"
    outcome = driver.run_sweep(_spec(), exp, live=False)
    assert outcome.complete
    df = reader.scan_results(exp / "results").collect().sort("split.criterion")
    assert df["status"].to_list() == ["failed", "failed", "ok", "ok"]
    failed = df.filter(df["status"] == "failed")
    assert all(r.startswith("FloatingPointError: loss diverged") for r in failed["failure_reason"])
    assert all("Traceback" in d and "FloatingPointError" in d for d in failed["failure_detail"])
    assert failed["objective"].null_count() == 2
    # a resume neither re-runs nor duplicates anything, failed trials included; the CLI says how many failed (item 8)
    from orchestrator.cli import sweep_main

    space_file = tmp_path / "fake.yaml"
    space_file.write_text(yaml.safe_dump(SPACE))
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(exp), "--resume", "--no-live"]) == 1
    assert "2 of 4 trials failed" in capsys.readouterr().err
    assert driver.count_rows(exp, 4) == outcome.counts
    assert len(_lines(exp / "fake_completions.log")) == 2


@pytest.mark.slow
def test_a_deleted_finished_row_is_re_run(tmp_path, ray_cluster):  # issue 14 item 3
    exp = tmp_path / "exp"
    first = driver.run_sweep(_spec(), exp, live=False)
    assert first.complete
    victim = sorted(reader.finished_trials(exp / "results"))[0]
    (exp / "results" / f"{victim}.parquet").unlink()
    again = driver.run_sweep(_spec(), exp, mode="resume", live=False)
    assert again.complete and again.counts["ok"] == 4
    runs = _lines(exp / "fake_completions.log")
    assert runs.count(victim) == 2 and len(runs) == 5  # only the rowless trial ran again


def test_existing_experiment_needs_resume_or_restart(tmp_path):
    spec = _spec()
    exp = tmp_path / "exp"
    sweep_id, resuming = driver.setup_experiment(spec, exp, "new")
    assert not resuming
    with pytest.raises(FcsaeInputError, match="--resume"):
        driver.setup_experiment(spec, exp, "new")
    assert driver.setup_experiment(spec, exp, "resume") == (sweep_id, True)
    with pytest.raises(FcsaeInputError, match="search space changed"):
        driver.setup_experiment(_spec(num_samples=8), exp, "resume")
    (exp / "results").mkdir(exist_ok=True)
    (exp / "results" / "t1.parquet").write_bytes(b"x")
    (exp / "trials" / "t1").mkdir(parents=True, exist_ok=True)
    (exp / "report").mkdir()
    (exp / "report" / "report.md").write_text("old report")
    (exp / "notes.txt").write_text("mine")
    new_id, resuming = driver.setup_experiment(spec, exp, "restart")
    assert new_id != sweep_id and not resuming
    # Restart deletes only what the sweep wrote: the report and the user's file stay.
    assert not (exp / "results").exists() and not (exp / "trials").exists()
    assert (exp / "notes.txt").read_text() == "mine" and (exp / "report" / "report.md").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(FcsaeInputError, match="not empty"):
        driver.setup_experiment(spec, other, "restart")
    assert (other / "precious.txt").exists()


def test_cli_validation_error_exits_2(tmp_path, capsys):
    from orchestrator.cli import sweep_main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPACE, "num_samples": 0, "bogus": 1}))
    assert sweep_main(["--space", str(bad), "--experiment-dir", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "num_samples" in err and "bogus" in err
    assert not (tmp_path / "exp").exists()  # nothing half-written


def _driver(space_file: Path, exp: Path, *extra, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.Popen([str(SWEEP_BIN), "--space", str(space_file), "--experiment-dir", str(exp), "--no-live",
                             "--num-cpus", "2", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(cond, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"driver exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    pytest.fail("timed out waiting for the sweep to make progress")


def _recorded_alive(exp: Path) -> list[int]:
    info = json.loads((exp / "ray_pids.json").read_text())
    alive = []
    for rec in info["processes"]:
        try:
            if abs(psutil.Process(rec["pid"]).create_time() - rec["create_time"]) < 1e-3:
                alive.append(rec["pid"])
        except psutil.Error:
            pass
    return alive


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _all_gone(procs: list[psutil.Process], timeout: float) -> list[int]:
    """Pids of ``procs`` still running (not zombies) after up to ``timeout`` seconds."""
    end = time.time() + timeout
    while True:
        alive = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.time() > end:
            return alive
        time.sleep(0.5)


def _kill(proc: subprocess.Popen, exp: Path) -> tuple[list[str], dict]:
    """SIGKILL the driver alone; once all its processes are gone, the completions logged and the rows.

    Waiting matters: a trial worker can still land a row in the moment between the driver's death and its own.
    """
    tree = _tree(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the watchdog stops the killed driver's Ray processes (trial workers included) without waiting for a resume
    assert not _all_gone(tree, timeout=30), "Ray processes outlived the killed driver"
    return _lines(exp / "fake_completions.log"), reader.finished_trials(exp / "results")


@pytest.mark.slow
def test_resume_after_sigkill_runs_every_trial_exactly_once(tmp_path):
    """Kill mid-sweep: resume finishes with one row per trial and re-runs no trial that had a row.

    Why the older version of this test failed 1 in 5 under load: it killed as soon as trial 1 had a row,
    and trial 2 (started together with trial 1) was often in the last step between its runner logging a
    completion and its row landing. Such a trial has no row, so it is not finished and is rightly run again
    from its last checkpoint (its evals repeat), but the old oracle counted that as "a finished trial ran
    twice". The oracle below is exact: a trial with a row once the killed sweep's processes are gone never
    runs again; any other trial completes exactly once more than it had by then (a second, concurrent run
    of a trial, e.g. by a surviving worker of the killed sweep, would show). The other cause, Ray deleting a
    checkpoint before saving the state that names its successor, is fixed in the driver (num_to_keep=None).
    ``test_a_trial_killed_between_its_work_and_its_row_is_re_run_once`` makes that window deterministic.
    """
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.3}))
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(yaml.safe_dump(SPACE))
    exp = tmp_path / "exp"
    proc = _driver(space_file, exp)
    # kill once one trial finished and another is mid-way (it has a checkpoint but no row)
    _wait_for(lambda: len(reader.trial_files(exp / "results")) >= 1
              and len(_lines(exp / "fake_starts.log")) >= 3, 240, proc)
    done_at_kill, rows_before = _kill(proc, exp)
    assert 1 <= len(rows_before) < 4
    abandoned = exp / "trials" / "abandoned_00099"  # as left by a trial started just before the kill
    (abandoned / "checkpoint").mkdir(parents=True)
    resumed = _driver(space_file, exp, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    df = reader.scan_results(exp / "results").collect()
    failed = df.filter(df["status"] != "ok").select("trial_id", "status", "failure_reason").rows()
    assert df.height == 4 and df["trial_id"].n_unique() == 4 and not failed, f"{failed}\n{out[-3000:]}"
    assert set(df["sweep_id"]) == {json.loads((exp / "sweep.json").read_text())["sweep_id"]}
    completions = _lines(exp / "fake_completions.log")
    for tid in df["trial_id"]:
        expected = done_at_kill.count(tid) + (tid not in rows_before)
        assert completions.count(tid) == expected, (tid, rows_before, done_at_kill, completions)
    assert "4 ok, 0 failed, 0 pruned of 4" in out
    assert not (exp / "ray_pids.json").exists() and not abandoned.exists()
    # the Optuna study continued: trial numbers went on (grid stays balanced), no sample was drawn twice
    assert sorted(df["split.criterion"]) == ["fc", "fc", "none", "none"]
    assert df["tracker.ema_alpha"].n_unique() == 4


@pytest.mark.slow
def test_a_trial_killed_between_its_work_and_its_row_is_re_run_once(tmp_path):
    """The window that made the old SIGKILL test flaky, held open: the trial has no row, so it runs again, once."""
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.05, "hold_s": 60}))
    raw = copy.deepcopy(SPACE)
    raw.update(num_samples=2, max_concurrent=1)
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(yaml.safe_dump(raw))
    exp = tmp_path / "exp"
    proc = _driver(space_file, exp)
    _wait_for(lambda: len(_lines(exp / "fake_completions.log")) >= 1, 240, proc)
    done_at_kill, rows_before = _kill(proc, exp)
    assert len(done_at_kill) == 1 and not rows_before
    # and the kill landed while Ray copied its state into ray/ (it failed CI once): the file is empty
    (state,) = ray_state.state_files(exp / "ray")
    state.write_text("")
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.05}))
    resumed = _driver(space_file, exp, "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    assert "torn" in out and (exp / "ray" / (state.name + ".torn")).exists()
    df = reader.scan_results(exp / "results").collect()
    assert df.height == 2 and set(df["status"]) == {"ok"}
    assert _lines(exp / "fake_completions.log").count(done_at_kill[0]) == 2  # re-run once, one row


@pytest.mark.slow
def test_ray_starts_while_prepare_runs(tmp_path):
    """A prepare that outlasts Ray's start sees Ray up before it returns (the two no longer run one after the other)."""
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.01}))
    raw = copy.deepcopy(SPACE)
    raw.update(num_samples=2, max_concurrent=2)
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(yaml.safe_dump(raw))
    exp = tmp_path / "exp"
    proc = _driver(space_file, exp, env={"FCSAE_FAKE_PREPARE_WAIT_RAY": "180"})
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((exp / "prepared.json").read_text())["ray_up_during_prepare"] is True
    assert "ran together" in out


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_prints_resume_command(tmp_path, request):
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.3}))
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(yaml.safe_dump(SPACE))
    exp = tmp_path / "exp"
    # A cluster address left behind by `ray start` / ray.cluster_utils (here: a dead one) must not be joined.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    proc = _driver(space_file, exp, env={"RAY_TMPDIR": str(ray_tmp)})
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    _wait_for(lambda: len(_lines(exp / "fake_starts.log")) >= 1, 240, proc)
    pids = _recorded_alive(exp)
    assert pids
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out and "Tuner.restore" not in out  # fcsae's resume command, not Ray's advice
    time.sleep(2)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_asha_stopped_trials_get_pruned_rows(tmp_path, ray_cluster):
    """The fake's fvu depends on the step only, so ASHA must stop trials at its rungs; each still gets one row."""
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.05}))
    raw = copy.deepcopy(SPACE)
    raw.update(num_samples=4, max_concurrent=1,
               scheduler={"type": "asha", "metric": "train.fvu", "mode": "max", "grace_period": 1, "reduction_factor": 2})
    raw["fixed"]["trainer"]["log_every"] = 1
    exp = tmp_path / "exp"
    outcome = driver.run_sweep(space.parse_space(raw), exp, live=False)
    df = reader.scan_results(exp / "results").collect()
    assert outcome.complete and df.height == 4 and df["trial_id"].n_unique() == 4
    assert outcome.counts["pruned"] >= 1, outcome.counts
    pruned = df.filter(df["status"] == "pruned")
    assert all("ASHA" in r for r in pruned["failure_reason"])
    assert sorted(pruned["trial_id"]) != sorted(_lines(exp / "fake_completions.log"))


def test_leftover_processes_stopped_by_pid_and_start_time(tmp_path):
    """Processes recorded by a dead driver are stopped; a pid whose start time differs (recycled) is left alone."""
    mine = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        rec = lambda p, dt=0.0: {"pid": p.pid, "create_time": psutil.Process(p.pid).create_time() + dt}  # noqa: E731
        (tmp_path / "ray_pids.json").write_text(json.dumps(
            {"driver": 2**22 + 12345, "driver_create_time": 0.0, "processes": [rec(mine), rec(other, dt=100.0)]}))
        assert driver.stop_recorded_ray(tmp_path) == 1
        assert mine.wait(timeout=10) is not None
        assert other.poll() is None
        assert not (tmp_path / "ray_pids.json").exists()
    finally:
        for p in (mine, other):
            if p.poll() is None:
                p.terminate()
                p.wait()


@pytest.mark.slow
def test_dead_worker_gets_a_failed_row_from_the_driver(tmp_path, ray_cluster):
    """A worker killed outright (as by the OOM killer) cannot write its row; the driver writes it."""
    (tmp_path / "fake.json").write_text(json.dumps({"die": "fc"}))
    exp = tmp_path / "exp"
    # no retries: each would die the same way (test_multinode covers the retry of a dead node's trial)
    outcome = driver.run_sweep(_spec(), exp, live=False, max_failures=0)
    assert outcome.complete and outcome.counts == {"ok": 2, "failed": 2, "pruned": 0, "total": 4}
    df = reader.scan_results(exp / "results").collect()
    failed = df.filter(df["status"] == "failed")
    assert set(failed["split.criterion"]) == {"fc"} and failed["failure_reason"].null_count() == 0
    assert all("died" in r or "killed" in r for r in failed["failure_reason"])
    # one short line as the reason, Ray's whole record in the detail column (issue 14 item 9)
    assert all(len(r) <= 160 and "\n" not in r for r in failed["failure_reason"]), failed["failure_reason"].to_list()
    assert all(len(d) > len(r) for d, r in zip(failed["failure_detail"], failed["failure_reason"]))


@pytest.mark.slow
def test_fail_fast_stops_the_sweep_at_the_first_failure(tmp_path, ray_cluster):
    (tmp_path / "fake.json").write_text(json.dumps({"fail": "none"}))  # grid cell 0: the very first trial
    exp = tmp_path / "exp"
    raw = copy.deepcopy(SPACE)
    raw.update(num_samples=8, max_concurrent=1)
    outcome = driver.run_sweep(space.parse_space(raw), exp, fail_fast=True, live=False)
    assert outcome.counts["failed"] >= 1 and not outcome.complete
    assert outcome.counts["ok"] + outcome.counts["failed"] < 8


def test_idle_tail_names_the_idle_slots():  # issue 13 item 8
    assert driver.idle_tail(4, 2) is None and driver.idle_tail(0, 2) is None and driver.idle_tail(5, 1) is None
    line = driver.idle_tail(3, 2)
    assert "last round runs 1 with 1 slot(s) idle" in line and "~25% of the slot time" in line
    assert "3 slot(s) idle" in driver.idle_tail(1, 4) and "~75%" in driver.idle_tail(1, 4)
    assert "2 slot(s) idle" in driver.idle_tail(10, 4)  # 3 rounds of 4 slots for 10 trials

