"""Downstream evaluation protocols of a CGNS export, one module per protocol.

``python -m cgns.downstream --task NAME`` (``cgns evaluate``, ``cgns evaluate`` in a clone) parses the
command line (:mod:`cgns.downstream.arguments`) and calls ``PROTOCOLS[NAME].run``
(:mod:`cgns.downstream.protocols`).

How a task is added (one module, three registry lines):

1. Write ``cgns/downstream/<name>.py`` with

   - ``run(args) -> dict``: the whole protocol; ``args`` is the parsed command line (every option
     of ``cgns evaluate``, with the task's ``DEFAULTS`` filled in). It writes its files under
     ``args.output_dir`` (``cgns.downstream.common.write_results`` writes ``results.json`` / ``results.md``)
     and returns the results dict;
   - ``DEFAULTS = TASK_DEFAULTS["<name>"]`` and, when it has options of its own, ``ARGUMENTS`` (a dataclass):
     both defined in :mod:`cgns.downstream.specs` (the protocol's defaults for the shared hyperparameters that
     it uses, ``max_epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``{}`` when it trains nothing), so that
     the command line and ``--help`` are built without importing any protocol (or torch);
   - optionally ``check_arguments(args)``: raise ``ValueError`` (one line) for arguments the protocol
     cannot run with, before any data is loaded.

   Shared helpers come from the modules below the protocols: ``common`` (splits, image processor, the
   frozen-tower Trainer, seeds, mean ± std, results files), ``embeddings`` (load an export, encode and cache
   embeddings) and ``prompts`` (the zero-shot prompts). A protocol never imports another protocol, nor
   ``cli``.
2. Register it: ``"<name>": "<name>"`` in ``specs.MODULES``, its defaults in ``specs.TASK_DEFAULTS`` and its
   options class in ``specs.TASK_ARGUMENTS``, and a loader (an explicit ``from . import <name>``) in
   :mod:`cgns.downstream.protocols`.
"""
