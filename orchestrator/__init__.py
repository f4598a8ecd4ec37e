"""Sweeps of fcsae trials with Ray Tune + Optuna. The only package that imports ray."""
