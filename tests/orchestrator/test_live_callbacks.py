"""LiveCallbacks: pickled into Tune's experiment state, it unpickles forwarding to the current driver's callbacks."""

import pickle

from ray.tune import Callback

from orchestrator.live_callbacks import HOOKS, LiveCallbacks, set_live


class _Recorder(Callback):
    def __init__(self):
        self.seen = []

    def on_trial_result(self, **info):
        self.seen.append(("result", info["result"]))

    def setup(self, **info):
        self.seen.append(("setup", info))


def test_unpickled_forwarder_reaches_the_callbacks_registered_now():
    old, new = _Recorder(), _Recorder()
    set_live([old])
    blob = pickle.dumps([LiveCallbacks()])  # what a first driver's RunConfig stores
    set_live([new])  # a resuming driver registers its own live callbacks
    (restored,) = pickle.loads(blob)
    restored.setup(stop=None)
    restored.on_trial_result(iteration=1, trials=[], trial=None, result={"x": 1})
    restored.on_step_begin(iteration=1, trials=[])  # hooks the callbacks do not override are Callback's no-ops
    assert new.seen == [("setup", {"stop": None}), ("result", {"x": 1})] and old.seen == []
    set_live([])
    assert {"setup", "on_trial_result", "on_trial_error", "on_experiment_end"} <= set(HOOKS)
