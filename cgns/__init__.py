"""CM-CGNS, the application: the ``cgns`` command and the runs built on the ``modeling_cgns`` library.

* :mod:`cgns.cli`: the ``cgns`` console command (``prepare | pretrain | evaluate | visualize | demo``);
* :mod:`cgns.experiments`: runs composed of the layers below (the demo, the ablation, studies);
* :mod:`cgns.pretraining`: the two-stage pretraining recipe on Accelerate (``python -m cgns.pretraining``);
* :mod:`cgns.downstream`: the downstream protocols (``python -m cgns.downstream``);
* :mod:`cgns.configs`: the named run configs (``--config demo``).

Imports go down: ``cgns`` uses ``data_scripts`` and ``modeling_cgns``; neither of them imports ``cgns``.
"""
