"""Evaluations of a trained SAE: core reconstruction metrics and first-letter absorption."""
