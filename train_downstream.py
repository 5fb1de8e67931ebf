"""Downstream evaluation of a CGNS export (from a clone): ``python train_downstream.py --task NAME ...``.

The protocols are the package ``cgns.downstream`` (docs/evaluation.md); with an install use ``cgns evaluate``
or ``python -m cgns.downstream``.
"""
from cgns.downstream.cli import main

if __name__ == "__main__":
    main()
