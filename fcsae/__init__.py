"""fcsae: sparse autoencoders with a frequency-consistency tracker against feature absorption."""

__version__ = "0.1.0"
