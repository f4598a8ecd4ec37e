"""Object storage: a sweep with ``--storage s3://...`` against a local S3 server (moto, loopback only).

Rows, trial artefacts, Ray Tune's state and resume after a SIGKILL all go
through the bucket; ``fcsae query`` and ``fcsae-report`` read from it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.test_sweep import REPO, SPACE, SWEEP_BIN, _all_gone, _lines, _tree

pytestmark = pytest.mark.slow
BUCKET = "fcsae-test"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server on 127.0.0.1 (random port), stopped after the test; yields (endpoint, env for clients)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "fcsae", "AWS_SECRET_ACCESS_KEY": "fcsae", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.time() > end or server.poll() is not None:
                    pytest.fail("moto server did not start")
                time.sleep(0.2)
        for key, value in env.items():  # this process reads the bucket too (pyarrow takes credentials from the env)
            monkeypatch.setenv(key, value)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir(BUCKET)
        yield f"127.0.0.1:{port}", env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _run(cmd, env, timeout=300):
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_sweep_rows_artefacts_state_and_resume_on_s3(tmp_path, s3, capsys, monkeypatch):
    import pyarrow.fs as pafs

    t0 = time.time()
    endpoint, aws = s3
    storage = f"s3://{BUCKET}/sweeps?endpoint_override={endpoint}&scheme=http"
    exp_uri = f"s3://{BUCKET}/sweeps/fake?endpoint_override={endpoint}&scheme=http"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")
    logs = tmp_path / "exp"
    logs.mkdir()
    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.2}))
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(yaml.safe_dump(SPACE))
    env = {**os.environ, **aws, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
           "FCSAE_HOME": str(tmp_path / "home"), "FCSAE_FAKE_DIR": str(logs)}
    monkeypatch.setenv("FCSAE_HOME", str(tmp_path / "home"))  # this process's mirror of the bucket
    args = [str(SWEEP_BIN), "--space", str(space_file), "--storage", storage, "--no-live", "--num-cpus", "2"]

    def rows():
        sel = pafs.FileSelector(f"{BUCKET}/sweeps/fake/results", allow_not_found=True)
        return sorted(Path(i.path).stem for i in fs.get_file_info(sel) if i.path.endswith(".parquet"))

    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    end = time.time() + 240
    while not (rows() and len(_lines(logs / "fake_starts.log")) >= 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < end, "sweep made no progress"
        time.sleep(0.3)
    tree = _tree(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _all_gone(tree, timeout=30)
    # what the killed sweep left, once its last worker is gone (a worker may land a row after the driver died)
    rows_before, done_at_kill = rows(), _lines(logs / "fake_completions.log")
    assert 1 <= len(rows_before) < 4

    resumed = _run(args + ["--resume"], env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "4 ok, 0 failed, 0 pruned of 4" in resumed.stdout
    assert len(rows()) == 4
    completions = _lines(logs / "fake_completions.log")
    for tid in rows():
        assert completions.count(tid) == done_at_kill.count(tid) + (tid not in rows_before), tid
    # artefacts and Ray's state are in the bucket, not on local disk
    for tid in rows():
        assert fs.get_file_info(f"{BUCKET}/sweeps/fake/trials/{tid}/params.json").type == pafs.FileType.File
    state = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/fake/ray"))
    assert any(Path(i.path).name.startswith("experiment_state-") for i in state)
    assert fs.get_file_info(f"{BUCKET}/sweeps/fake/sweep.json").type == pafs.FileType.File

    # the readers, in this process (the bucket's credentials are in os.environ): fcsae query, fcsae-report
    from fcsae.cli import main as fcsae_main
    from fcsae.report.cli import main as report_main

    capsys.readouterr()
    assert fcsae_main(["query", "--results", exp_uri, "--format", "json",
                       "SELECT trial_id, status, trial_dir FROM trials ORDER BY trial_id"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["trial_id"] for r in got] == rows() and {r["status"] for r in got} == {"ok"}
    assert all(r["trial_dir"].startswith(f"s3://{BUCKET}/sweeps/fake/trials/") for r in got)
    assert report_main([exp_uri, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.md").is_file()
    print(f"s3 sweep test: {time.time() - t0:.1f} s")
