"""`make demo` (and `make ablation` with ``--ablation``): the whole CGNS pipeline on the embedded synthetic
chest X-rays, offline, on a CPU. The run is ``cgns.experiments.demo`` (docs/demo.md); with an install use
``cgns demo``.
"""
from cgns.experiments.demo import main

if __name__ == "__main__":
    main()
