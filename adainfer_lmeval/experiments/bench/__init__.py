"""The wall-clock benchmark's parts (its command line: :mod:`adainfer_lmeval.experiments.benchmark`).

:mod:`.timing` (timed passes, interleaved repeats, speedups) and :mod:`.machine` (load, provenance)
also serve the GPU check (:mod:`adainfer_lmeval.experiments.gpu`), which imports from here and
never the other way round.
"""
