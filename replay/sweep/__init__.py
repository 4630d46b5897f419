"""``shadowtrace sweep``: replay traces under a grid of engine configurations.

``grid`` turns ``--set KEY=V1,V2`` options into configurations (typed by
:mod:`replay.shadow.config`), ``run`` replays each (trace, configuration)
as one Dask task through :func:`replay.session.replay`, ``table`` makes the
rows a polars table, ``progress`` shows it. See ``docs/sweep.md``.
"""
