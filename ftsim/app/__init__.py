"""The application on top of every other package: the command line (:mod:`~ftsim.app.cli`), the registry of
experiments and verifiers (:mod:`~ftsim.app.registry`), the runner that runs an experiment and draws its figures
(:mod:`~ftsim.app.runner`), the main job (:mod:`~ftsim.app.reproduce`) and the README's generated blocks
(:mod:`~ftsim.app.docs`)."""
