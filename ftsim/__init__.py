"""ftsim -- a fine-tuning theory simulator.

Packages, layered in one direction (``pyproject.toml`` states the contract; ``tests/test_layers.py`` checks it):

* ``ftsim.app``   the command line, registry, runner and main job; the only package that imports figures.
* ``figures``     draws figures from tidy result tables.
* ``simulate``    the synthetic world (HMMs, exact inference, corpora, small LMs); ``real_tasks`` real data and
  pretrained LMs. Neither imports the other.
* ``theory``      model-agnostic math (kernels, solvers, fine-tuning methods, bounds).
* ``ftsim.core``  io, config, claims, the experiment protocol, the unit cache; imports nothing of the project.
"""

__version__ = "0.2.0"
