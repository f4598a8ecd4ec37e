"""fcsae's copy of Ray Tune's experiment state, and mending a state file torn by a kill mid-save."""

import json
import os
import time

import pytest

from fcsae.errors import FcsaeInputError
from orchestrator import ray_state

STATE = "experiment_state-2026-12-02_07-00-00.json"
SEARCHER = "searcher-state-2026-12-02_07-00-00.pkl"


def _ray_dir(tmp_path, trials=("a1", "b2")):
    d = tmp_path / "ray"
    d.mkdir()
    data = [[json.dumps({"trial_id": t, "status": "TERMINATED"}), "{}"] for t in trials]
    (d / STATE).write_text(json.dumps({"trial_data": data}))
    (d / SEARCHER).write_bytes(b"\x80\x05searcher")
    (d / "a1").mkdir()  # a trial dir: not part of the copy
    _age(d)
    return d


def _age(d, seconds=5.0):
    """Make every file look written ``seconds`` ago (the copy waits for a quiet moment)."""
    past = time.time() - seconds
    for p in d.iterdir():
        os.utime(p, (past, past))


def test_copy_is_taken_when_quiet_and_restores_a_torn_state_byte_for_byte(tmp_path):
    d = _ray_dir(tmp_path)
    want = {n: (d / n).read_bytes() for n in (STATE, SEARCHER)}
    assert ray_state.take_snapshot(d) is not None
    (d / STATE).write_text("")  # what a SIGKILL during Tune's copy leaves
    (d / SEARCHER).write_bytes(b"newer")
    assert ray_state.mend(d) is True
    assert {n: (d / n).read_bytes() for n in (STATE, SEARCHER)} == want
    assert (d / (STATE + ".torn")).read_text() == ""
    assert ray_state.trial_states(d) == {"a1": "TERMINATED", "b2": "TERMINATED"}


def test_no_copy_while_a_file_was_just_written_or_the_state_is_torn(tmp_path):
    d = _ray_dir(tmp_path)
    (d / SEARCHER).write_bytes(b"just now")
    assert ray_state.take_snapshot(d) is None
    _age(d)
    (d / STATE).write_text('{"trial_data": [')
    _age(d)
    assert ray_state.take_snapshot(d) is None
    assert not (d / ray_state.SNAPSHOT_NAME).exists()


def test_unchanged_files_are_not_copied_again(tmp_path):
    d = _ray_dir(tmp_path)
    first = ray_state.take_snapshot(d)
    assert first is not None and ray_state.take_snapshot(d, first) is None


def test_mend_leaves_a_readable_state_alone(tmp_path):
    d = _ray_dir(tmp_path)
    ray_state.take_snapshot(d)
    (d / SEARCHER).write_bytes(b"newer")
    assert ray_state.mend(d) is False
    assert (d / SEARCHER).read_bytes() == b"newer"


def test_a_torn_state_without_a_copy_is_one_clear_error_and_nothing_is_touched(tmp_path):
    d = _ray_dir(tmp_path)
    (d / STATE).write_text("")
    with pytest.raises(FcsaeInputError, match="torn.*--restart"):
        ray_state.mend(d)
    assert (d / STATE).exists() and not (d / (STATE + ".torn")).exists()


def test_a_session_torn_before_its_first_copy_resumes_from_the_session_before(tmp_path):
    d = _ray_dir(tmp_path)
    newer = d / "experiment_state-2026-12-02_08-00-00.json"
    newer.write_text("")
    assert ray_state.mend(d) is True
    assert [p.name for p in ray_state.state_files(d)] == [STATE]
    assert ray_state.trial_states(d) == {"a1": "TERMINATED", "b2": "TERMINATED"}
