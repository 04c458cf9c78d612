"""Wei, Xie & Ma (2021): head tuning vs prompt tuning on HMM data.

* :mod:`simulate.wei2021.oracles`     exact oracles on exact posteriors (no training noise)
* :mod:`simulate.wei2021.models`      small masked / causal transformers
* :mod:`simulate.wei2021.pretrain`    pretraining on HMM corpora, cached checkpoints, TV curves
* :mod:`simulate.wei2021.tuning`      head tuning, prompt tuning, attention head (frozen model)
* :mod:`simulate.wei2021.experiments` ``ftsim run wei2021-exp1|wei2021-exp2``
* :mod:`simulate.wei2021.verify`      ``ftsim verify wei2021``
"""
