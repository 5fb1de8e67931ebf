"""``python -m cgns.downstream``: the downstream evaluation command line (:mod:`cgns.downstream.cli`)."""
from .cli import main

if __name__ == "__main__":
    main()
