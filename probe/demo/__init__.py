"""The demo ``rankguard demo`` runs, shipped with the package (torch side).

- :mod:`.scenario`: what it trains (the failing run :data:`~.scenario.DEMO`, its healthy twin
  :data:`~.scenario.CONTROL`, and the settings ``benchmarks/`` builds its catalog on);
- :mod:`.model`, :mod:`.data`, :mod:`.failure`, :mod:`.train`: the small GPT, its byte corpus
  (the Python standard library's own sources: nothing is downloaded), the one definition of
  a failed run, and the training loop;
- :mod:`.run`: the demo itself (server, probe, alerts, the closing table); ``twin.json``: the
  unprotected twin's recorded outcome it prints beside its own.

Changing what the demo shows is an edit of :mod:`.scenario` and :mod:`.run` (and
``python -m benchmarks.demo`` to record the new twin); the packaging stays as it is.
"""
