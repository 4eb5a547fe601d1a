"""ZOPrO workflow: preference optimisation with zeroth-order methods, as an importable package."""
