"""``python -m cgns``: the ``cgns`` command (:mod:`cgns.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
