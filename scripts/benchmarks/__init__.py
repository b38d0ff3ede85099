"""Measure the mass-mail job against baselines; run it through scripts/bench."""
