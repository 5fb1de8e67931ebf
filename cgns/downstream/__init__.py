"""Downstream evaluation protocols of a CGNS export, one module per protocol.

``python -m cgns.downstream --task NAME`` (``cgns evaluate``, ``cgns evaluate`` in a clone) parses the
command line (:mod:`cgns.downstream.arguments`) and calls ``PROTOCOLS[NAME].run``
(:mod:`cgns.downstream.protocols`).

How a task is added (one module, one line):

1. Write ``cgns/downstream/<name>.py`` with

   - ``run(args) -> dict``: the whole protocol; ``args`` is the parsed command line (every option
     of ``cgns evaluate``, with the task's ``DEFAULTS`` filled in). It writes its files under
     ``args.output_dir`` (``cgns.downstream.common.write_results`` writes ``results.json`` / ``results.md``)
     and returns the results dict;
   - ``DEFAULTS``: the protocol's defaults for the shared hyperparameters that it uses (``max_epochs``,
     ``batch_size``, ``lr``, ``weight_decay``); ``{}`` when it trains nothing;
   - optionally ``check_arguments(args)``: raise ``ValueError`` (one line) for arguments the protocol
     cannot run with, before any data is loaded.

   Shared helpers come from the modules below the protocols: ``common`` (splits, image processor, the
   frozen-tower Trainer, seeds, mean ± std, results files), ``embeddings`` (load an export, encode and cache
   embeddings) and ``prompts`` (the zero-shot prompts). A protocol never imports another protocol, nor
   ``cli``.
2. Import it in :mod:`cgns.downstream.protocols` and add one line ``"<name>": <name>,`` to ``PROTOCOLS``.
"""
