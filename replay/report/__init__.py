"""What a replay gives back: data documents and presentation.

``results`` (the JSON document), ``parquet`` (events and shadow lives as
Parquet), ``console`` (everything printed for people: summaries, tables,
progress) and ``plot`` (a PNG timeline of one replay). Counting lives in
:mod:`replay.analysis`; nothing here changes a result.
"""
