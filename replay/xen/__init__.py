"""The real Xen as the oracle: decode its trace of a scenario, compare it with the model.

Pipeline: :mod:`.records` (the record layouts, defined once) ->
:mod:`.decode` (bytes to rows) -> :mod:`.annotate` (vCPU, markers, window,
symbols) -> :mod:`.summary` (counts by kind and window) and
:mod:`.compare` (model vs Xen). Running Xen itself is
:mod:`qmp_tools.xen`'s job.
"""
