"""The CM-CGNS pretraining recipe on Accelerate, one concern per module (imports go down this list):

* :mod:`~cgns.pretraining.arguments`: the three argument dataclasses, ``--config`` + overrides, ``args.json``;
* :mod:`~cgns.pretraining.state`: the run's shared state and its position in training;
* :mod:`~cgns.pretraining.preemption`: stop signals -> a checkpoint at a step boundary and exit status 75;
* :mod:`~cgns.pretraining.optimization`: the two stages, each with a fresh Adam and warm-up + cosine;
* :mod:`~cgns.pretraining.lock`: the output folder's run lock (one writer per folder);
* :mod:`~cgns.pretraining.checkpointing`: output-dir policy, resume checks, save / list / resolve / verify / load;
* :mod:`~cgns.pretraining.data`: dataset, seeded sampler and crops, DataLoaders;
* :mod:`~cgns.pretraining.build`: accelerator, model, processor, the prepared run;
* :mod:`~cgns.pretraining.plots`: the ``metrics.jsonl`` reader and the loss-curve plot;
* :mod:`~cgns.pretraining.callbacks`: stage switch, cluster reassignment, checkpoint, logging;
* :mod:`~cgns.pretraining.loop`: the training loop and its finite / sentence checks;
* :mod:`~cgns.pretraining.export`: ``final/`` (model, processor, model card);
* :mod:`~cgns.pretraining.cli`: ``main(argv)``, the recipe in order (``python -m cgns.pretraining``).
"""
