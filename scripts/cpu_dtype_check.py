"""Is bf16 faster than fp32 for a model on this CPU, and does it fit? Prints one line per dtype.

    python scripts/cpu_dtype_check.py qwen2.5-coder-1.5b --tokens 128 --repeats 5

Loads the converted model once per dtype, runs a forward over a fixed 128-token prompt
(``logits_to_keep=1``: lm-eval scores a few positions, not the whole vocabulary at every one),
and reports the best of ``--repeats`` wall-clock times (the minimum is the least disturbed by
other load on a shared machine), the peak resident memory, and the largest logit difference
against fp32 at the last position. A ratio, not a test: timing belongs in benchmarks.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from adainfer_lmeval.offline.models.fetch import resolve_pretrained

    folder = resolve_pretrained(a.model)
    ids = torch.randint(100, 20000, (1, a.tokens), generator=torch.Generator().manual_seed(0))
    reference = None
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        with torch.inference_mode():
            model(ids, logits_to_keep=1)  # warm-up
            best = float("inf")
            for _ in range(a.repeats):
                start = time.perf_counter()
                logits = model(ids, logits_to_keep=1).logits[0, -1].float()
                best = min(best, time.perf_counter() - start)
        times[dtype] = best
        diff = 0.0 if reference is None else float((logits - reference).abs().max())
        reference = logits if reference is None else reference
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{a.model} {str(dtype).removeprefix('torch.'):8s} forward {a.tokens} tokens: {best * 1000:7.0f} ms (best of {a.repeats}, "
              f"{a.threads} threads)  peak RSS so far {peak_gb:.1f} GB  max |logit - fp32| {diff:.3f}", flush=True)
        del model
    print(f"bf16 / fp32 time: {times[torch.bfloat16] / times[torch.float32]:.2f}")


if __name__ == "__main__":
    main()
