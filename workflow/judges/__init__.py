"""Judges: pairwise preference judges and the pairs stage that collects judged pairs."""
