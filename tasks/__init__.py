"""Prefect tasks: one module per pipeline stage, each running its stage through DVC."""
