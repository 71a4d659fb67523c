"""Allow ``python -m benchlib`` (what ``scripts/bench`` runs)."""

from benchlib.cli import main

raise SystemExit(main())
