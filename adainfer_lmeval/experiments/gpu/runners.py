"""What the GPU check times: random-weight models of real shapes, its requests, its variants, and
the runners that pass requests through lm-eval's request path or (without lm-eval) the engine."""

from __future__ import annotations

import torch

from adainfer_lmeval.core.accounting import CostModel
from adainfer_lmeval.core.engine import EarlyExitEngine, ExitBatch
from adainfer_lmeval.core.exit_checks import ExitCheckConfig
from adainfer_lmeval.experiments.bench.variants import Variant, exit_records, make_backend, score
from adainfer_lmeval.policies import ExitPolicy, build_policy

#: Real model shapes for timing (random weights). Llama-3.2-1B: 16 layers of 2048 with GQA and a
#: tied 128k head; Llama-2-7B: 32 layers of 4096, 32k head.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=4096),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512),
}
CHECK_VOCAB = 64  # K of the mixed-exit variant that pays for pruned checks (adainfer_lmeval/core/exit_checks.py)


class RowDrawnExits(ExitPolicy):
    """Exit each row at its own layer, drawn uniformly from ``min_layer``..L (seeded, per row).

    Knows nothing of the model's outputs: the rows leave the batch at different layers, as under
    a real policy, so the time of shrinking batches is measured on its own. With ``features``
    the engine also pays for the exit checks at every consulted layer (the decisions ignore them).
    """

    name = "row_drawn"

    def __init__(self, min_layer: int, seed: int = 0, features: tuple[str, ...] = ()):
        self.min_layer = int(min_layer)
        self.seed = seed
        self.features = tuple(features)
        self.reset()

    def reset(self) -> None:
        """Start the draws again: every pass then exits the same rows at the same layers."""
        self.generator = torch.Generator().manual_seed(self.seed)

    def decide(self, layer, num_layers, history):
        # Of the layers layer..L still open to a surviving row, this one with equal chance.
        draw = torch.rand(history.shape[0], generator=self.generator) < 1.0 / (num_layers - layer + 1)
        return draw.to(history.device)

    def describe(self) -> dict:
        return {"name": self.name, "min_layer": self.min_layer, "features": list(self.features)}


def shape_model(name: str, device, dtype: torch.dtype):
    """A random-weight LlamaConfig model of a real shape, built directly on ``device``."""
    import transformers as tf

    config = tf.LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[name])
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def timing_requests(count: int, seq_len: int, vocab: int, seed: int = 0) -> list:
    """Distinct random contexts of ``seq_len``·3/4 .. ``seq_len`` tokens, a one-token continuation
    each: one computed row per request, as lm-eval's multiple-choice requests of one question are
    not (they would share a row)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(max(2, 3 * seq_len // 4), seq_len + 1, (1,), generator=g))
        context = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append(((f"doc{i}", "x"), context, [int(torch.randint(4, vocab, (1,), generator=g))]))
    return out


def variant_specs(num_layers: int) -> list[dict]:
    """hf, full, static at half depth, mixed exits (no checks), mixed exits paying pruned checks."""
    half, low = max(1, num_layers // 2), max(1, num_layers // 4)
    return [
        {"label": "hf", "variant": Variant("hf")},
        {"label": "full", "variant": Variant("full")},
        {"label": f"static(layer={half})", "variant": Variant("static", {"layer": half})},
        {"label": f"mixed({low}..{num_layers})", "variant": Variant("full"), "policy": RowDrawnExits(low)},
        {"label": f"mixed({low}..{num_layers})+checks(K={CHECK_VOCAB})",
         "variant": Variant("full", {"check_vocab": CHECK_VOCAB}), "policy": RowDrawnExits(low, features=("gap",))},
    ]


def _set_policy(engine, policy: ExitPolicy) -> None:
    policy.bind(engine.stack.identity())
    engine.policy = policy  # the generator reads its policy from the engine


class LmEvalRunner:
    """One variant through lm-eval's request path (``_loglikelihood_tokens``) at one batch size."""

    def __init__(self, spec: dict, model, tokenizer, batch_size: int, device):
        self.label, self.policy = spec["label"], spec.get("policy")
        self.lm = make_backend(spec["variant"], model, tokenizer, batch_size, str(device))
        if self.policy is not None:
            _set_policy(self.lm.engine, self.policy)

    def __call__(self, requests) -> list:
        if self.policy is not None:
            self.policy.reset()
        return exit_records(score(self.lm, requests))


class EngineRunner:
    """Without lm-eval: the engine itself (``hf`` becomes a plain right-padded ``model(...)`` forward)."""

    def __init__(self, spec: dict, model, tokenizer, batch_size: int, device):
        self.label, self.policy, self.model, self.batch_size, self.device = spec["label"], spec.get("policy"), model, batch_size, device
        variant = spec["variant"]
        self.engine = None
        if not variant.is_hf:
            args = dict(variant.policy_args)
            checks = ExitCheckConfig(vocab=args.pop("check_vocab", None))
            self.engine = EarlyExitEngine(model, self.policy or build_policy(variant.name, args), checks=checks)
            self.costs = CostModel.from_stack(self.engine.stack, check_vocab=checks.vocab)

    @torch.no_grad()
    def __call__(self, requests) -> list:
        if self.policy is not None:
            self.policy.reset()
        rows = sorted(((c + k)[:-1] for _, c, k in requests), key=len, reverse=True)
        records = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = ExitBatch.from_rows(chunk, [len(r) - 1 for r in chunk], device=self.device)
            if self.engine is None:
                logits = self.model(batch.input_ids).logits
                torch.log_softmax(logits.float(), -1).amax(-1).sum().item()  # score like a backend, one sync
                continue
            out = self.engine.run(batch)
            for j, row in enumerate(chunk):
                torch.log_softmax(out.logits[j].float(), -1)
                records.append(self.costs.request(len(row), out.exit_layers[j], 1, out.checks[j], 1,
                                                  out.pruned_checks[j], out.check_rows[j]))
        return records
