"""Speed and accuracy measurements (not tests), run from the repository root as `python -m benchmarks.X`."""
