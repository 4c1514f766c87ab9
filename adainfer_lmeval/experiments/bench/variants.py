"""The backends the benchmark compares on one copy of the weights, and what their responses record."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The threshold operating point per model (see reports/benchmark/README.md for how it was chosen).
DEFAULT_THRESHOLDS = {
    "smollm2-135m": {"gap": 0.6, "min_layer": 20},
    "qwen2.5-coder-0.5b": {"gap": 0.6, "min_layer": 22},
}
#: The answer-option margin operating point per model: the threshold's first layer and a margin of
#: 0.9, for timing what policy=margin and policy=simlens cost (not calibrated for accuracy; the
#: study calibrates them).
DEFAULT_MARGINS = {
    "smollm2-135m": {"margin": 0.9, "min_layer": 20},
    "qwen2.5-coder-0.5b": {"margin": 0.9, "min_layer": 22},
}
DEFAULT_CHECK_VOCAB = 64  # K of the pruned-vocabulary checks variant (adainfer_lmeval/core/exit_checks.py)
#: The head-clusters variant per model (adainfer_lmeval/core/head_clusters.py): the fewest head rows
#: per pick with top-1 recall near 99% where the threshold consults (reports/benchmark/README.md).
DEFAULT_CHECK_CLUSTERS = {"smollm2-135m": {"check_clusters": 256},
                          "qwen2.5-coder-0.5b": {"check_clusters": 2048, "check_probes": 32}}


@dataclass
class Variant:
    name: str  # "hf" or the adainfer policy name
    policy_args: dict = field(default_factory=dict)

    @property
    def is_hf(self) -> bool:
        return self.name == "hf"

    @property
    def label(self) -> str:
        if self.is_hf:
            return "hf"
        args = ",".join(f"{k}={v}" for k, v in self.policy_args.items())
        return f"{self.name}({args})" if args else self.name


def variants_for(model_name: str, threshold: dict | None = None, svm: bool = True, log=print,
                 check_vocab: int | None = DEFAULT_CHECK_VOCAB, check_clusters: int | None = None) -> list[Variant]:
    """hf, full, threshold, margin and (if shipped for this model) svm; threshold and svm also with cheap
    checks: pruned-vocabulary (``check_vocab``), and its first check picked from head clusters
    (``check_clusters``)."""
    out = [Variant("hf"), Variant("full")]
    cheap = []  # the check args of the cheap-check variants
    clusters = DEFAULT_CHECK_CLUSTERS.get(model_name) if check_clusters is None else (
        {"check_clusters": check_clusters} if check_clusters else None)
    if check_vocab:
        cheap.append({"check_vocab": check_vocab})
        if clusters:
            cheap.append({"check_vocab": check_vocab, **clusters})
    threshold = threshold if threshold is not None else DEFAULT_THRESHOLDS.get(model_name)
    if threshold:
        out.append(Variant("threshold", dict(threshold)))
        out.extend(Variant("threshold", {**threshold, **args}) for args in cheap)
    if model_name in DEFAULT_MARGINS:  # one head row per option: no cheap-check variant to add
        out.append(Variant("margin", dict(DEFAULT_MARGINS[model_name])))
        # the same point read off the SimLens continuation: its checks carry two tokens on
        out.append(Variant("simlens", dict(DEFAULT_MARGINS[model_name])))
    if svm:
        try:
            from adainfer_lmeval.policies import learned  # noqa: F401  (registers policy=svm)
            from adainfer_lmeval.policies import files as policy_files
            from adainfer_lmeval.policies import registered_policies

            path = policy_files.shipped_path(model_name, "svm")
            if "svm" in registered_policies() and path.is_file():
                out.append(Variant("svm"))
                out.extend(Variant("svm", dict(args)) for args in cheap[-1:])
            else:
                log(f"[benchmark] {model_name}: no shipped svm policy ({path}); skipping policy=svm")
        except Exception as exc:  # learned policies absent or broken: skip, say why
            log(f"[benchmark] {model_name}: policy=svm unavailable ({type(exc).__name__}: {exc}); skipping")
    return out


def without_check_args(variant: Variant) -> Variant:
    """The same policy with full-vocabulary checks (what a cheap-check variant is compared with)."""
    from adainfer_lmeval.core.exit_checks import CHECK_ARGS

    return Variant(variant.name, {k: v for k, v in variant.policy_args.items() if k not in CHECK_ARGS})


def make_backend(variant: Variant, model, tokenizer, batch_size: int, device: str = "cpu"):
    from adainfer_lmeval.adapter.backend import AdaInferLM
    from adainfer_lmeval.adapter.harness import HFLM

    common = dict(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    if variant.is_hf:
        return HFLM(**common)
    return AdaInferLM(policy=variant.name, **variant.policy_args, **common)


def score(lm, requests: list) -> list:
    """The pass both benchmarks time: lm-eval's loglikelihood of already tokenised requests."""
    return lm._loglikelihood_tokens(requests, disable_tqdm=True)


def exit_records(responses) -> list:
    """The ExitRecords adainfer's responses carry (hf's carry none)."""
    return [r.exit for r in responses if hasattr(r, "exit")]
