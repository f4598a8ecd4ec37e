"""fcsae: sparse autoencoders with a frequency-consistency tracker against feature absorption."""

from fcsae.threads import default_wait_policy as _default_wait_policy

__version__ = "0.1.0"

_default_wait_policy()  # before anything imports torch (its OpenMP runtime reads the policy once, at load)
