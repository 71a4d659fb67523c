"""Allow ``python -m qsd_py``."""

from qsd_py.main import main

raise SystemExit(main())
