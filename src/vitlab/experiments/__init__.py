"""Families of runs: sweeps, collection into tables, comparisons and reports. Analysis reads run
directories only (`runs.find_runs`); it never imports the trainer."""
from .runs import Run, find_runs, load_run

__all__ = ["Run", "find_runs", "load_run"]
