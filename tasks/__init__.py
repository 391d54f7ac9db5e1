"""Prefect tasks: one generic task running any pipeline stage through DVC (stages.py), and DVC itself (dvc.py)."""
