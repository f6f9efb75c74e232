"""Serve the champion from the MLflow registry with BentoML: follow aliases, route traffic, log."""
