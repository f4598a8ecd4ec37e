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


HOOKS = tuple(name for name, attr in vars(Callback).items() if callable(attr) and (name == "setup" or name.startswith("on_")))
"""Every hook of ``ray.tune.Callback`` (the names Ray's own ``CallbackList`` must forward)."""
for _hook in HOOKS:
    setattr(LiveCallbacks, _hook, _forward(_hook))
