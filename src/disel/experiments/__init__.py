"""Experiments: the toy regression, sweeps and the demo."""
