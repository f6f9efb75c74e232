"""`python -m champion_cli VERB ...`, the same as `champion VERB ...` (and what `torchrun -m` starts)."""

from champion_cli.cli import main

raise SystemExit(main())
