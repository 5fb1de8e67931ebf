"""``python -m cgns.pretraining`` (also ``accelerate launch -m cgns.pretraining`` and
``torchrun -m cgns.pretraining``): the pretraining command line of :mod:`cgns.pretraining.cli`."""
from .cli import main

if __name__ == "__main__":
    main()
