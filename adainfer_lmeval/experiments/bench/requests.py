"""The loglikelihood requests the benchmark times: ``((context, continuation), context_enc, continuation_enc)``."""

from __future__ import annotations

import torch

from adainfer_lmeval.adapter import request_encoding


def build_requests(lm, task_limits: dict[str, int], manager=None) -> tuple[list, dict]:
    """lm-eval's loglikelihood requests, built by lm-eval itself (0-shot).

    Tokenised by lm-eval's ``loglikelihood`` (:func:`~adainfer_lmeval.adapter.loglikelihood.tokenized_requests`).
    Returns the requests and, per task, (documents, requests).
    """
    from adainfer_lmeval.adapter.harness import task_dict, task_manager
    from adainfer_lmeval.adapter.loglikelihood import tokenized_requests
    from adainfer_lmeval.offline.environment import configure_offline_environment

    configure_offline_environment()
    manager = manager or task_manager()
    tasks = task_dict(list(task_limits), manager)
    requests, counts = [], {}
    for name in task_limits:  # a fixed order, whatever order lm-eval returns
        task = tasks[name]
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=task_limits[name], rank=0, world_size=1)
        instances = [i for i in task.instances if i.request_type == "loglikelihood"]
        requests.extend(tokenized_requests(lm, instances))
        counts[name] = {"documents": len({i.doc_id for i in instances}), "requests": len(instances)}
    return requests, counts


def synthetic_requests(tokenizer, n_docs: int, choices: int = 2, seed: int = 0) -> list:
    """Small multiple-choice-like requests from random tokens (for smoke tests)."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    out = []
    for d in range(n_docs):
        ctx = torch.randint(4, vocab, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        for c in range(choices):
            cont = torch.randint(4, vocab, (1 + (c + d) % 2,), generator=g).tolist()
            out.append(((f"doc{d}", f"choice{c}"), ctx, cont))
    return out


def encoded(requests: list, max_length: int):
    """The requests as the engine groups and rows them (:mod:`adainfer_lmeval.adapter.request_encoding`)."""
    return request_encoding.encode([(c, k) for _, c, k in requests], max_length)


def workload(requests: list, max_length: int) -> dict:
    """Rows each way: lm-eval's hf backend runs one row per distinct input (its one-token-continuation
    logits cache); adainfer runs one row per request. Both counts, with the tokens each way."""
    inputs = [tuple(row) for row in encoded(requests, max_length).rows]
    return {"requests": len(requests), "distinct_inputs": len(set(inputs)),
            "tokens_per_request": sum(map(len, inputs)), "tokens_distinct": sum(map(len, set(inputs)))}
