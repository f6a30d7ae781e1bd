"""Analytical tools: KV-cache and weight sizing, and a roofline model of prefill/decode.

Modules, one job each:

* :mod:`kvjax.analysis.spec` — :class:`ArchSpec`, an architecture description general
  enough for sizing (dense GQA models, GPT-3 style models, MLA + MoE models).
* :mod:`kvjax.analysis.layers` — the weight matrices and vectors of each block.
* :mod:`kvjax.analysis.presets` — architectures typed in from public model cards.
* :mod:`kvjax.analysis.sizing` — dtypes, KV-cache bytes, parameter counts, crossover.
* :mod:`kvjax.analysis.roofline` — FLOPs, bytes moved and time floors per step.
* :mod:`kvjax.analysis.bandwidth` — measured read/copy bandwidth and queued timing.
* :mod:`kvjax.analysis.size_cli` — the ``size`` CLI subcommand.
"""
