"""ftsim — a fine-tuning theory simulator.

The distribution installs five packages, layered in one direction:

* ``theory``      model-agnostic math (kernels, solvers, bounds); imports none of the others.
* ``ftsim.io``, ``ftsim.config``, ``ftsim.claims``  leaf utilities (atomic files, config dataclasses, claim
  tables); import nothing from the project.
* ``simulate``    the synthetic world (HMMs, exact inference, corpora, small LMs); uses ``theory``.
* ``real_tasks``  real datasets, prompts and pretrained LMs; uses ``theory``.
* ``figures``     draws figures from tidy result tables.
* ``ftsim.cli``   the command line on top; it only dispatches.
"""

__version__ = "0.1.0"
