"""The distributed path with Ray's own multi-node harness: two raylets on this machine (``ray.cluster_utils.Cluster``).

Trials spread over both nodes, per-trial resources are checked against the
cluster, and a worker node killed mid-trial has its trial retried (Tune's
``FailureConfig``) from its last checkpoint on the surviving node; the sweep
still ends with one ``ok`` row per trial.
"""

import copy
import json
import os
import time

import pytest

from fcsae.errors import FcsaeInputError
from orchestrator import driver, space
from results_schema import reader
from tests.orchestrator.test_sweep import REPO, SPACE, _lines

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes(monkeypatch):
    """A head and a worker node, one CPU each; never advertised in /tmp/ray/ray_current_cluster."""
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    # Cluster() would make every plain ray.init() on this machine join it (other users' sweeps and tests).
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()


def _raw(**changes):
    raw = copy.deepcopy(SPACE)
    raw.update(changes)
    return raw


def _starts(exp):
    """(trial_id, node_id, step it started from) per trial start, from the fake runner's log."""
    path = exp / "fake_nodes.log"
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def test_trials_spread_over_two_nodes_and_survive_a_node_kill(tmp_path, two_nodes):
    cluster, worker = two_nodes
    with pytest.raises(FcsaeInputError, match="cluster has 2.0 CPUs"):
        driver.check_cluster_resources(space.parse_space(_raw(resources={"cpu": 3}), check_machine=False))

    (tmp_path / "fake.json").write_text(json.dumps({"step_s": 0.4}))
    exp = tmp_path / "exp"
    spec = space.parse_space(_raw(num_samples=4, max_concurrent=2), check_machine=False)

    import threading

    killed = {}

    def kill_worker_mid_trial():
        """Once a trial on the worker node has checkpointed past step 2, kill that node."""
        end = time.time() + 150
        while time.time() < end and not killed:
            for tid, node, _ in _starts(exp):
                ckpt = exp / "trials" / tid / "fake_ckpt.json"
                if node == worker.node_id and ckpt.exists() and json.loads(ckpt.read_text())["step"] >= 4:
                    if reader.read_trial(exp / "results", tid) is None:
                        killed.update(trial=tid, step=json.loads(ckpt.read_text())["step"])
                        cluster.remove_node(worker, allow_graceful=False)
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_worker_mid_trial, daemon=True)
    killer.start()
    t0 = time.time()
    outcome = driver.run_sweep(spec, exp, address=cluster.address, live=False, max_failures=2)
    killer.join(timeout=10)
    df = reader.scan_results(exp / "results").collect()
    assert killed, f"no trial ran on the worker node: {_starts(exp)}"
    assert outcome.complete and outcome.counts["ok"] == 4, (outcome.counts, df.select("trial_id", "failure_reason"))
    assert df.height == 4 and df["trial_id"].n_unique() == 4
    starts = _starts(exp)
    assert len({node for _, node, _ in starts}) == 2  # both nodes ran trials
    victim = [(node, int(step)) for tid, node, step in starts if tid == killed["trial"]]
    assert len(victim) == 2 and victim[0][0] == worker.node_id
    retry_node, retry_step = victim[1]
    assert retry_node == cluster.head_node.node_id  # the surviving node
    assert killed["step"] <= retry_step < 10  # resumed from its checkpoint, not from scratch
    assert _lines(exp / "fake_completions.log").count(killed["trial"]) == 1
    print(f"multi-node sweep: {time.time() - t0:.1f} s")
