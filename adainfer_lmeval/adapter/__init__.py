"""The lm-eval adapter, the only package that imports lm-eval.

:mod:`.backend` (the ``adainfer`` model, a thin HFLM subclass) with its two replaced request
paths, :mod:`.loglikelihood` and :mod:`.generate_until`; :mod:`.model_args` (``--model_args``
parsed and checked before weights load) and :mod:`.model_source` (``pretrained`` resolved, its
config read); :mod:`.responses` (answers carrying exit records) and :mod:`.response_cache`
(``--use_cache``); :mod:`.request_encoding` (lm-eval requests -> engine batches),
:mod:`.results` (exit statistics into lm-eval's results), :mod:`.startup_hook` (how plain
``lm_eval`` finds the model) and :mod:`.harness` (the rest of the package's one door to lm-eval). This file imports nothing: the start-up hook runs at every
interpreter start.
"""
