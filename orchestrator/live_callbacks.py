"""Tune callbacks that come back live from ``Tuner.restore``, through Ray's public API only.

Tune pickles the ``RunConfig``, callbacks included, into the experiment state,
and ``Tuner.restore`` unpickles it: callbacks holding one driver's live state
(the progress view, the row keeper) would come back as stale copies. Give Tune
``LiveCallbacks()`` instead: it pickles as a bare reference and forwards every
hook to the callbacks the current driver process registered with
``set_live``, whether the tuner is new or restored.
"""

from __future__ import annotations

from ray.tune import Callback

_LIVE: list[Callback] = []


def set_live(callbacks: list[Callback]) -> None:
    """The callbacks every ``LiveCallbacks`` in this process forwards to (replacing earlier ones)."""
    _LIVE[:] = list(callbacks)


def _forward(hook: str):
    def call(self, **info):
        for cb in _LIVE:
            getattr(cb, hook)(**info)

    call.__name__ = hook
    call.__doc__ = f"Forward ``{hook}`` to the live callbacks."
    return call


class LiveCallbacks(Callback):
    """Forwards every Tune callback hook to ``set_live``'s callbacks; unpickles as a fresh forwarder."""

    def __reduce__(self):
        return (LiveCallbacks, ())

    setup = _forward("setup")
    on_step_begin = _forward("on_step_begin")
    on_step_end = _forward("on_step_end")
    on_trial_start = _forward("on_trial_start")
    on_trial_restore = _forward("on_trial_restore")
    on_trial_save = _forward("on_trial_save")
    on_trial_result = _forward("on_trial_result")
    on_trial_complete = _forward("on_trial_complete")
    on_trial_recover = _forward("on_trial_recover")
    on_trial_error = _forward("on_trial_error")
    on_checkpoint = _forward("on_checkpoint")
    on_experiment_end = _forward("on_experiment_end")
