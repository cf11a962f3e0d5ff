"""``python -m samnorm`` is the ``samnorm`` command (see :mod:`samnorm.cli`)."""

from samnorm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
