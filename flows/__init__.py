"""Prefect flows: the training pipeline."""
