"""Imported first by each entry point (`python -m pipeline|training|slurm`, the tests' conftest):
the OpenMP wait settings and thread pools' sizes, set before numpy and torch start their thread
pools (they read them once, when loaded). Importing the rest of the project changes nothing."""

from .runtime import quiet_threads

quiet_threads()
