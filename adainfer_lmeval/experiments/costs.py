"""What one token costs per layer and per check, from weight counts (no weights read)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """``python -m adainfer_lmeval.experiments.costs MODEL ...``: what one token costs per layer, per check.

    Builds each model on the meta device (no weights read) and prints its cost model's ratios:
    the full exit head at one position and one skipped layer's K/V fill, against one decoder
    layer for one token (the generation step), from weight counts.
    """
    import sys

    import torch
    import transformers

    from adainfer_lmeval.core.accounting import CostModel
    from adainfer_lmeval.core.architectures import DecoderStack
    from adainfer_lmeval.offline.models.fetch import resolve_pretrained

    for name in (sys.argv[1:] if argv is None else argv):
        config = transformers.AutoConfig.from_pretrained(resolve_pretrained(name))
        with torch.device("meta"):
            costs = CostModel.from_stack(DecoderStack(transformers.AutoModelForCausalLM.from_config(config)))
        print(f"{name}: layers {costs.num_layers}, weights per layer {costs.layer_params:,}, head {costs.head_params:,} "
              f"({costs.head_params / costs.layer_params:.1f}x a layer), K/V fill of a skipped layer {costs.kv_params:,} "
              f"({100 * costs.kv_params / costs.layer_params:.1f}% of a layer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
