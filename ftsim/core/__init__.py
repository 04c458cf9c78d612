"""The core of ftsim: files written atomically, content hashes and tables (:mod:`~ftsim.core.io`), config
dataclasses and their flags (:mod:`~ftsim.core.config`), claims (:mod:`~ftsim.core.claims`), the experiment
protocol (:mod:`~ftsim.core.experiment`), the unit cache (:mod:`~ftsim.core.cache`), aggregation
(:mod:`~ftsim.core.tables`), progress bars and thread pools.

It imports nothing else of the project (the layer contract in ``pyproject.toml`` is checked by the tests)."""
