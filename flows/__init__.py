"""Prefect flows: the training pipeline, scheduled retraining and its deployment."""
