"""Corpora as units of the shared cache: a corpus is a pure function of its :class:`~simulate.corpus.CorpusSpec`,
written once into the cache (atomically, every file checksummed) and shared by every run that needs it."""

from __future__ import annotations

from ftsim.core.cache import Unit, UnitCache, unit_key
from simulate.corpus import Corpus, CorpusSpec, load_corpus, write_corpus

__all__ = ["CORPUS_UNIT_VERSION", "corpus_unit"]

CORPUS_UNIT_VERSION = 2  # 2: corpus format 2 (parameters as .npy)


def corpus_unit(cache: UnitCache, spec: CorpusSpec, *, overwrite: bool = False,
                progress: bool = True) -> tuple[Unit, Corpus]:
    """The corpus ``spec`` from the cache (written there first if needed): the unit and the opened corpus (the
    cache verified every file's SHA-256 on the way)."""
    key = unit_key("corpus", CORPUS_UNIT_VERSION, spec.describe())

    def compute(work):
        manifest = write_corpus(work.path / "corpus", spec, progress=progress)
        return {"tokens": manifest["num_sequences"] * manifest["length"], "shards": len(manifest["shards"])}

    unit = cache.get_or_compute(key, compute, overwrite=overwrite)
    return unit, load_corpus(unit.path / "corpus", verify=False)
