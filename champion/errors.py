"""Errors meant for people: one sentence that names the field or file and the fix."""


class ChampionError(Exception):
    """A user-facing error; the CLI prints its message without a traceback and exits 2."""


class InterruptedRun(ChampionError):
    """A run stopped by Ctrl-C or SIGTERM before it registered anything."""
