"""The experiment directory without Ray: marker, lock, --restart/--resume refusals, unwritable paths, row atomicity.

Each test names the issue-14 item it guards.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from fcsae.errors import FcsaeInputError
from orchestrator import driver, experiment
from orchestrator.cli import sweep_main
from results_schema import store
from tests.orchestrator.test_sweep import REPO, SPACE, _spec


@pytest.fixture
def space_file(tmp_path):
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def _foreign(d: Path) -> None:
    (d / "sub").mkdir(parents=True)
    (d / "sweep.json").write_text('{"note": 1}')
    (d / "precious.txt").write_text("x")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_restart_refuses_a_directory_fcsae_did_not_mark(tmp_path, space_file, capsys):  # item 1
    d = tmp_path / "d"
    _foreign(d)
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(d), "--restart"]) == 2
    assert "not written by fcsae" in _one_line_error(capsys)
    assert (d / "precious.txt").read_text() == "x" and (d / "sub").is_dir()
    assert sorted(p.name for p in d.iterdir()) == ["precious.txt", "sub", "sweep.json"]  # not even a lock file


@pytest.mark.parametrize("content", ['{"note": 1}', '{"sweep_id": "x", "spa', ""])
def test_resume_of_a_foreign_or_truncated_sweep_json_is_one_line(tmp_path, space_file, capsys, content):  # item 1
    d = tmp_path / "d"
    d.mkdir()
    (d / "sweep.json").write_text(content)
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(d), "--resume"]) == 2
    assert "sweep.json" in _one_line_error(capsys)


def test_restart_deletes_only_what_fcsae_wrote(tmp_path):  # item 1
    spec = _spec()
    exp = tmp_path / "exp"
    with experiment.ExperimentLock(_made(exp)):
        old_id, _ = driver.setup_experiment(spec, exp, "new")
        store.write_trial(exp / "results", {"trial_id": "t1", "status": "ok", "sweep_id": old_id})
        (exp / "trials" / "t1").mkdir(parents=True)
        (exp / "notes.md").write_text("mine")
        new_id, resuming = driver.setup_experiment(spec, exp, "restart")
    assert new_id != old_id and not resuming
    assert (exp / "notes.md").read_text() == "mine"
    assert not (exp / "results").exists() and not (exp / "trials").exists()


def _made(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def _hold_lock(exp: Path) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from orchestrator.experiment import ExperimentLock; "
            "ExperimentLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(exp)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_driver_refused_while_the_first_holds_the_lock(tmp_path, space_file, capsys):  # item 2
    exp = _made(tmp_path / "exp")
    holder = _hold_lock(exp)
    try:
        # before the holder wrote anything else (no sweep.json, no ray_pids.json): still refused
        assert sweep_main(["--space", str(space_file), "--experiment-dir", str(exp), "--restart"]) == 2
        assert f"pid {holder.pid}" in _one_line_error(capsys)
        assert sorted(p.name for p in exp.iterdir()) == [experiment.LOCK_NAME]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: no stale lock to clean up by hand
    with experiment.ExperimentLock(exp):
        pass


def test_resume_of_a_missing_experiment_refuses_and_lists_the_existing(tmp_path, space_file, capsys):  # item 4
    for name in ("alpha", "beta"):
        with experiment.ExperimentLock(_made(tmp_path / name)):
            driver.setup_experiment(_spec(name=name), tmp_path / name, "new")
    (tmp_path / "not-an-experiment").mkdir()
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(tmp_path / "alpah"), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert "no experiment to resume" in err and "alpha, beta" in err and "not-an-experiment" not in err
    assert not (tmp_path / "alpah").exists()


def test_experiment_dir_that_is_a_file_is_one_line(tmp_path, space_file, capsys):  # item 6
    f = tmp_path / "file"
    f.write_text("x")
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(f)]) == 2
    assert "not a directory" in _one_line_error(capsys)
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(f / "exp")]) == 2
    assert "is a file" in _one_line_error(capsys)


@pytest.fixture
def read_only():
    """Make a directory read-only for this user: chmod for a normal user, ``chattr +i`` for root."""
    made = []

    def make(d: Path) -> Path:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode:
                pytest.skip("running as root without chattr: cannot make a directory read-only")
        else:
            d.chmod(0o555)
        made.append(d)
        try:
            (d / ".probe").write_text("")
        except OSError:
            return d
        pytest.skip(f"{d} is still writable")

    yield make
    for d in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(d)])
        else:
            d.chmod(0o755)


def test_read_only_storage_and_experiment_dir_are_one_line(tmp_path, space_file, capsys, read_only):  # item 6
    ro = read_only(_made(tmp_path / "ro"))
    assert sweep_main(["--space", str(space_file), "--storage", str(ro)]) == 2
    assert "cannot create the experiment directory" in _one_line_error(capsys)
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(ro)]) == 2
    assert "lock file" in _one_line_error(capsys)


def test_unwritable_results_on_resume_refused_before_any_work(tmp_path, read_only):  # item 6
    spec = _spec()
    exp = tmp_path / "exp"
    with experiment.ExperimentLock(_made(exp)):
        driver.setup_experiment(spec, exp, "new")
        (exp / "results").mkdir()
        read_only(exp / "results")
        with pytest.raises(FcsaeInputError, match="results: not writable"):
            driver.setup_experiment(spec, exp, "resume")


def test_a_trials_files_land_together_or_not_at_all(tmp_path, monkeypatch):  # item 6
    real = store._write

    def fail_main_row(table, path):
        if path.parent.name != store.PER_LETTER_DIR:
            raise PermissionError(13, "Permission denied", str(path))
        real(table, path)

    monkeypatch.setattr(store, "_write", fail_main_row)
    letters = pl.DataFrame({"letter": ["a"], "probe_f1": [0.9]})
    with pytest.raises(PermissionError):
        store.write_trial(tmp_path, {"trial_id": "t1", "status": "ok"}, per_letter=letters)
    assert not list(tmp_path.rglob("*.parquet"))


def test_abandoned_trial_leftovers_removed_known_and_finished_kept(tmp_path):  # item 7
    for tid in ("running", "finished", "abandoned"):
        (tmp_path / "trials" / tid / "checkpoint").mkdir(parents=True)
    store.write_trial(tmp_path / "results", {"trial_id": "finished", "status": "ok"},
                      per_letter=pl.DataFrame({"letter": ["a"]}))
    store.write_trial(tmp_path / "results" / "tmp", {"trial_id": "abandoned", "status": "ok"},
                      per_letter=pl.DataFrame({"letter": ["a"]}))
    shutil.move(tmp_path / "results" / "tmp" / "per_letter" / "abandoned.parquet", tmp_path / "results" / "per_letter")
    gone = experiment.remove_abandoned(tmp_path, known={"running"}, with_rows={"finished"})
    assert gone == ["abandoned"]
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["finished", "running"]
    assert [p.stem for p in (tmp_path / "results" / "per_letter").iterdir()] == ["finished"]


def test_sweep_json_marks_the_experiment(tmp_path):  # item 1
    with experiment.ExperimentLock(_made(tmp_path / "exp")):
        driver.setup_experiment(_spec(), tmp_path / "exp", "new")
    meta = json.loads((tmp_path / "exp" / "sweep.json").read_text())
    assert meta["format"] == experiment.FORMAT and experiment.is_experiment(tmp_path / "exp")
    assert meta["grid_names"] == _spec().grid_names and meta["grid_names"]  # what fcsae-report groups arms by


def test_a_space_that_prepare_refuses_leaves_nothing_behind(tmp_path, space_file, capsys, monkeypatch):  # item 5
    monkeypatch.setenv("FCSAE_FAKE_PREPARE_ERROR", "lm.model: 'nope' is not a known model")
    exp = tmp_path / "exp"
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(exp)]) == 2
    assert "not a known model" in _one_line_error(capsys)
    assert not exp.exists()  # so the corrected space needs no --restart
    monkeypatch.delenv("FCSAE_FAKE_PREPARE_ERROR")
    with experiment.ExperimentLock(_made(exp)):
        assert not driver.setup_experiment(_spec(), exp, "new")[1]


def test_an_address_nothing_listens_on_fails_in_seconds_writing_nothing(tmp_path, space_file, capsys):  # item 5
    import socket
    import time

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    t0 = time.time()
    exp = tmp_path / "exp"
    assert sweep_main(["--space", str(space_file), "--experiment-dir", str(exp), "--address", f"127.0.0.1:{port}"]) == 2
    assert "no Ray cluster answers" in _one_line_error(capsys)
    assert time.time() - t0 < 10 and not exp.exists()


def test_one_line_keeps_leading_sentences_within_the_limit():  # item 9
    ray_text = ("The actor died unexpectedly before finishing this task. class_name: ImplicitFunc actor_id: "
                + "ab" * 40 + " pid: 123 The actor is dead because its worker process has died. " * 4)
    line = driver.one_line(ray_text)
    assert line == "The actor died unexpectedly before finishing this task."
    assert len(driver.one_line("x" * 500)) == 160


def test_leftovers_found_by_the_driver_token_even_unrecorded(tmp_path):  # item 7
    """A process started just before the kill (not in any snapshot) still carries the driver's token."""
    from orchestrator import ray_procs

    token = "t" * 32
    carrier = subprocess.Popen(["sleep", "60"], env={**os.environ, ray_procs.TOKEN_VAR: token})
    bystander = subprocess.Popen(["sleep", "60"], env={**os.environ, ray_procs.TOKEN_VAR: "other"})
    try:
        (tmp_path / ray_procs.PIDS_FILE).write_text(json.dumps({"driver": 1, "token": token, "processes": []}))
        assert ray_procs.stop_recorded(tmp_path) == 1
        assert carrier.wait(timeout=10) is not None and bystander.poll() is None
    finally:
        for p in (carrier, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()
