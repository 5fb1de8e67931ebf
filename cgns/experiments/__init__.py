"""Runs composed of the layers below: :mod:`cgns.experiments.demo` (``make demo``, ``make ablation``,
``cgns demo``): pretraining, the downstream protocols and the report, on the embedded synthetic data."""
