"""Is `policy=full` slower than policies that compute as much? (reports/benchmark/README.md, SmolLM2 PIQA)

Times, interleaved on one copy of SmolLM2, the study's first 20 PIQA test documents (40 requests)
at batch 1: full depth, a margin rule that never stops (margin=1.0 from layer 29), static exit at
layer 29 and the study's simlens point, 4 repeats, then one instrumented pass each (where the time
goes). Prints the per-pass seconds and the breakdowns.

    python scripts/check_full_depth_path.py
"""

import transformers as tf

from adainfer_lmeval.experiments.bench import study_cell
from adainfer_lmeval.experiments.bench.runs import benchmark_model
from adainfer_lmeval.experiments.bench.variants import Variant, make_backend
from adainfer_lmeval.offline.models.fetch import resolve_pretrained

folder = resolve_pretrained("smollm2-135m")
model, tokenizer = tf.AutoModelForCausalLM.from_pretrained(folder).eval(), tf.AutoTokenizer.from_pretrained(folder)
requests, docs = study_cell.cell_requests(make_backend(Variant("hf"), model, tokenizer, 1), "piqa@0", 80)
first = set(sorted(set(docs), key=study_cell.document_order)[:20])
requests = [r for r, d in zip(requests, docs) if d in first]
variants = [Variant("full"), Variant("margin", {"margin": 1.0, "min_layer": 29}), Variant("static", {"layer": 29}),
            Variant("simlens", {"margin": 0.827476, "min_layer": 29})]
result = benchmark_model("smollm2-135m", model, tokenizer, requests, variants, [1], 4, profile=True)
for row in result["rows"]:
    print(row["variant"], "pass seconds", [round(t, 2) for t in row["times_s"]], "ideal", round(row["ideal_speedup"], 3))
for key, b in result["breakdown"].items():
    print(key, f"{b['total_s']:.2f}s", {k: round(v, 1) for k, v in b["percent"].items() if v > 0.5})
