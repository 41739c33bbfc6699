"""``python -m afpa`` is the ``afpa`` command."""

from afpa.cli import main

raise SystemExit(main())
