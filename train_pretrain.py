"""Two-stage CM-CGNS pretraining (from a clone): ``python train_pretrain.py --config demo [--key value ...]``.

The recipe is the package ``cgns.pretraining`` (docs/pretraining.md); with an install use ``cgns pretrain``,
``python -m cgns.pretraining``, ``accelerate launch -m cgns.pretraining`` or ``torchrun -m cgns.pretraining``.
"""
from cgns.pretraining.cli import main

if __name__ == "__main__":
    main()
