"""Training pipelines: data loading, fine-tuning. Each pipeline module reads top to bottom."""
