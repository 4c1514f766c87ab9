"""The lm-eval adapter, the only package that imports lm-eval.

:mod:`.backend` (the ``adainfer`` model, a thin HFLM subclass), :mod:`.request_encoding` (lm-eval
requests -> engine batches), :mod:`.results` (exit statistics into lm-eval's results) and
:mod:`.startup_hook` (how plain ``lm_eval`` finds the model). This file imports nothing: the
start-up hook runs at every interpreter start.
"""
