"""The early-exit engine: torch and transformers only.

Where each architecture keeps its layers, norm and head (:mod:`.architectures`), the exit step
run after each layer (:mod:`.exit_step`: checks, features, the policy's decision), the
loglikelihood engine (:mod:`.engine`) and per-token generation (:mod:`.generation`, with
:mod:`.kv_cache`), the exit checks and their cheap variants (:mod:`.exit_checks`,
:mod:`.head_clusters`), the exit signals' registry (:mod:`.features`) and the answer options'
distribution (:mod:`.options`), layer and FLOPs accounting
(:mod:`.accounting`), stage timing (:mod:`.stages`) and the policy interface
(:mod:`.exit_policy`). Nothing here imports lm-eval or the policies themselves.
"""
