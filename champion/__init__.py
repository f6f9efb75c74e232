"""Champion: keep the best model in production, closed-loop.

Nothing heavy is imported here, so `champion --help` stays fast.
"""

__version__ = "0.1.0"
