"""Champion's faces: the `champion` command, the console and the demo.

They sit on top of every floor (`pipelines`, `monitoring`, `serving`, `champion`) and nothing imports them.
"""
