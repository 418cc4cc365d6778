"""Benchmark tasks: readers of the datasets' standard files, recipes, and the runs that produce predictions."""
