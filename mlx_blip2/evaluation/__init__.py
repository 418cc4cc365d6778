"""Benchmark evaluation: metrics equal to the official scorers, dataset readers, recipes after LAVIS, runs."""
