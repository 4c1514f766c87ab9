"""The ``adainfer`` model under lm-eval's ``--use_cache``: a sqlite table of its own per set of
answer-changing args, and partial answers cached only together with their exit records."""

from __future__ import annotations

import hashlib
import json
import os


def response_key(pretrained, model, policy, checks: dict, hflm_args: dict) -> str:
    """A digest of everything that changes an answer: the model (its folder's files, by name,
    size and modification time), the policy (and its file's bytes), the exit checks and HFLM's
    args except the batch sizes (answers do not depend on them)."""
    from importlib import metadata

    if isinstance(pretrained, str):
        files = []
        if os.path.isdir(pretrained):
            for name in sorted(os.listdir(pretrained)):
                stat = os.stat(os.path.join(pretrained, name))
                files.append([name, stat.st_size, stat.st_mtime_ns])
        model_id = [os.path.abspath(pretrained) if os.path.isdir(pretrained) else pretrained, files]
    else:
        model_id = [type(model).__name__, model.config.to_json_string()]
    source = getattr(policy, "source", None)
    policy_bytes = None
    if isinstance(source, str) and os.path.isfile(source):
        with open(source, "rb") as fh:
            policy_bytes = hashlib.sha256(fh.read()).hexdigest()
    try:
        version = metadata.version("adainfer-lmeval")
    except metadata.PackageNotFoundError:
        version = None
    key = {
        "version": version, "model": model_id, "policy": policy.describe(),
        "policy_meta": getattr(policy, "meta", None), "policy_file": policy_bytes, "checks": checks,
        "args": {k: v for k, v in hflm_args.items() if k not in ("batch_size", "max_batch_size")},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def use_own_table(cache_hook, key: str | None) -> None:
    """Point the sqlite dict of lm-eval's CachingLM (``--use_cache``) at the table named by
    ``key``.

    CachingLM keys answers by the request alone, so answers computed under other model args
    (another policy, threshold, model) would be served from the same file.
    """
    dbdict = getattr(cache_hook, "dbdict", None)
    table = f"adainfer_{key}"
    if key is not None and dbdict is not None and getattr(dbdict, "tablename", table) != table:
        # In place: the CachingLM that handed the hook over reads and writes this same object.
        filename, autocommit = dbdict.filename, getattr(dbdict, "autocommit", True)
        dbdict.close()
        type(dbdict).__init__(dbdict, filename, tablename=table, autocommit=autocommit)


class RecordingHook:
    """HFLM's partial-result cache hook, but a partial answer is cached with its exit record
    (so a killed run resumes with complete statistics) or, where none is known yet, not at all
    (the caching wrapper stores the complete answer when the call returns)."""

    def __init__(self, hook, wrap):
        self.hook, self.wrap = hook, wrap

    def add_partial(self, attr, req, res) -> None:
        res = self.wrap(attr, req, res)
        if res is not None:
            self.hook.add_partial(attr, req, res)
