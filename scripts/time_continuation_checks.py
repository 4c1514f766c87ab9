"""What one continuation check costs on the clock, in layers of a 128-token prompt (batch 1, CPU).

For the study's read-outs (reports/study/README.md, "Other read-outs beside SimLens"): from layer l,
SimLens carries token 0 and the decision position through layers l+1..L alone
(``core.continuation.carry``); the filled continuation carries the decision position attending to
the whole prompt, whose K/V it projects at every layer run (``core.continuation.fill_carry``); the
last layer alone runs only layer L that way (``last_layers=1``). Each is timed against one decoder
layer over the whole prompt, medians of interleaved repeats, same process. Wait for a quiet
machine: timing beside other jobs is noise.

    python scripts/time_continuation_checks.py [--model qwen2.5-coder-0.5b] [--tokens 128] [--repeats 15]
"""

import argparse
import statistics
import time

import torch
import transformers as tf

from adainfer_lmeval.core.architectures import DecoderStack
from adainfer_lmeval.core.continuation import carry, fill_carry
from adainfer_lmeval.offline.models.fetch import resolve_pretrained

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="qwen2.5-coder-0.5b")
parser.add_argument("--tokens", type=int, default=128)
parser.add_argument("--repeats", type=int, default=15)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
torch.set_num_threads(args.threads)
model = tf.AutoModelForCausalLM.from_pretrained(resolve_pretrained(args.model), torch_dtype=torch.float32).eval()
stack = DecoderStack(model)
L, n = stack.num_layers, args.tokens
ids = torch.randint(100, stack.vocab_size - 100, (1, n), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    hidden = stack.embed(ids)
    inputs = stack.layer_inputs(hidden)
    states = [hidden]
    for index in range(L):
        states.append(stack.run_layer(index, states[-1], inputs))
    decision = n - 1
    starts = sorted({L // 2, (3 * L) // 4, L - 2})
    # (name, layers it runs, the job)
    jobs = [("one layer over the prompt", 1, lambda: stack.run_layer(L // 2, states[L // 2], inputs))]
    for l in starts:
        jobs += [(f"SimLens check from {l}", L - l, lambda l=l: carry(stack, l, states[l], [decision], [decision])),
                 (f"filled check from {l}", L - l, lambda l=l: fill_carry(stack, states[l], [l], [decision], [decision])),
                 (f"last layer alone from {l}", 1,
                  lambda l=l: fill_carry(stack, states[l], [l], [decision], [decision], last_layers=1))]
    times = [[] for _ in jobs]
    for _ in range(2):  # warm-up
        for _, _, job in jobs:
            job()
    for _ in range(args.repeats):  # interleaved, so that drift hits every job alike
        for t, (_, _, job) in zip(times, jobs):
            started = time.perf_counter()
            job()
            t.append(time.perf_counter() - started)
medians = [statistics.median(t) for t in times]
print(f"{args.model}: {L} layers, {n}-token prompt, batch 1, {args.threads} threads, median of {args.repeats}")
print("| check | layers run | ms | in layers over the prompt |")
print("|---|---|---|---|")
for (name, runs, _), m in zip(jobs, medians):
    print(f"| {name} | {runs} | {1000 * m:.2f} | {m / medians[0]:.2f} |")
