"""The one place that knows where each decoder family keeps its layers, final norm and head.

The early-exit engine runs a model layer by layer, so it must reproduce what the model's own
``forward`` does around its layers: embeddings, attention masks, position embeddings, and
the final norm + head (+ Gemma-3's logit soft-capping) that turn a hidden state into logits.
Everything architecture-specific lives here (cf. tuned-lens's ``model_surgery.py``); the
engine only calls :class:`DecoderStack`'s methods.

Supported families, checked against transformers 5.x: the Llama family (llama, mistral,
qwen2, and SmolLM2, which is llama), Gemma-3 text, GPT-2 and OPT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import AdaInferError
from .policies import ModelIdentity

ROTARY_FAMILY = ("llama", "mistral", "qwen2", "gemma3_text")
SUPPORTED_MODEL_TYPES = ROTARY_FAMILY + ("gpt2", "opt")


@dataclass
class LayerInputs:
    """What every layer call needs besides the hidden states, built once per batch shape."""

    position_ids: torch.Tensor
    masks: list[Any]  # one attention mask per layer (None: the causal fast path)
    position_embeddings: list[Any] = field(default_factory=list)  # one per layer (rotary only)


class DecoderStack:
    """Layer-by-layer access to a Hugging Face decoder-only causal LM.

    Layer numbering follows ``output_hidden_states``: layer 0 is the embeddings, layer k the
    output of the k-th decoder layer, layer ``num_layers`` the last one.
    """

    def __init__(self, model: nn.Module):
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type == "gemma3" and hasattr(config, "text_config"):
            model_type = "gemma3 (multimodal)"
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise AdaInferError(
                f"architecture {model_type!r} is not supported by the early-exit engine; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (text-only causal LMs)"
            )
        self.model = model
        self.config = config
        self.model_type = model_type
        if model_type in ROTARY_FAMILY:
            body = model.model
            self.layers = body.layers
            self._norms = [body.norm]
        elif model_type == "gpt2":
            body = model.transformer
            self.layers = body.h
            self._norms = [body.ln_f]
        else:  # opt
            body = model.model.decoder
            self.layers = body.layers
            self._norms = [m for m in (body.final_layer_norm, body.project_out) if m is not None]
        self.body = body
        self.head = model.get_output_embeddings()
        self.num_layers = len(self.layers)
        self.vocab_size = self.head.out_features
        self.softcap = getattr(config, "final_logit_softcapping", None)

    # ---- the pieces of the forward pass -------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Layer-0 hidden states, exactly as the model's forward builds them."""
        body = self.body
        if self.model_type in ROTARY_FAMILY:
            # Gemma-3's embed_tokens scales by sqrt(hidden) itself.
            return body.embed_tokens(input_ids)
        positions = self._positions(input_ids.shape[1], input_ids.device)
        if self.model_type == "gpt2":
            return body.drop(body.wte(input_ids) + body.wpe(positions))
        embeds = body.embed_tokens(input_ids)
        if body.project_in is not None:
            embeds = body.project_in(embeds)
        ones = torch.ones(1, input_ids.shape[1], device=input_ids.device)
        return embeds + body.embed_positions(ones, 0, position_ids=positions)

    def layer_inputs(self, hidden: torch.Tensor) -> LayerInputs:
        """Masks and position embeddings for a right-padded (or unpadded) batch of this shape.

        Right padding needs no attention mask: causal attention never lets a real token see
        the padding after it, and lm-eval's ``hf`` backend feeds its batches the same way.
        """
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        positions = self._positions(hidden.shape[1], hidden.device)
        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        if self.model_type != "opt":
            kwargs["position_ids"] = positions
        kinds = self._mask_kinds()
        built = {}
        for kind in set(kinds):
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            built[kind] = make(**kwargs)
        masks = [built[kind] for kind in kinds]
        rope = []
        if self.model_type == "gemma3_text":
            per_kind = {k: self.body.rotary_emb(hidden, positions, k) for k in set(kinds)}
            rope = [per_kind[kind] for kind in kinds]
        elif self.model_type in ROTARY_FAMILY:
            shared = self.body.rotary_emb(hidden, position_ids=positions)
            rope = [shared] * self.num_layers
        return LayerInputs(position_ids=positions, masks=masks, position_embeddings=rope)

    def run_layer(self, index: int, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """Apply decoder layer ``index`` (0-based); returns the hidden state of layer index+1."""
        layer = self.layers[index]
        mask = inputs.masks[index]
        if self.model_type in ROTARY_FAMILY:
            return layer(
                hidden,
                attention_mask=mask,
                position_embeddings=inputs.position_embeddings[index],
                position_ids=inputs.position_ids,
                cache=None,
            )
        if self.model_type == "gpt2":
            return layer(hidden, None, mask, None, use_cache=False, position_ids=inputs.position_ids)
        return layer(hidden, attention_mask=mask, position_ids=inputs.position_ids, cache=None, use_cache=False)

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and head applied to an intermediate hidden state."""
        for module in self._norms:
            hidden = module(hidden)
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def identity(self) -> ModelIdentity:
        source = str(getattr(self.config, "_name_or_path", "") or self.model_type)
        return ModelIdentity(
            name=source.rstrip("/").split("/")[-1],
            model_type=self.model_type,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
        )

    # ---- costs, for the FLOPs accounting -------------------------------------------------

    def layer_matmul_params(self) -> int:
        """Weights multiplied per token in one decoder layer (matrices only, not norms/biases)."""
        return sum(p.numel() for p in self.layers[0].parameters() if p.dim() >= 2)

    def attention_width(self) -> int:
        """num_heads × head_dim: the width of the QK^T and AV products per token."""
        config = self.config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
        head_dim = getattr(config, "head_dim", None) or self.hidden_size // heads
        return heads * head_dim

    @property
    def hidden_size(self) -> int:
        return getattr(self.config, "hidden_size", None) or getattr(self.config, "n_embd")

    def head_matmul_params(self) -> int:
        """Weights multiplied per position by the exit head (project_out included, for OPT)."""
        extra = sum(
            p.numel() for m in self._norms for p in m.parameters() if p.dim() >= 2
        )
        return self.head.weight.numel() + extra

    # ---- helpers --------------------------------------------------------------------------

    def _positions(self, length: int, device) -> torch.Tensor:
        return torch.arange(length, device=device).unsqueeze(0)

    def _mask_kinds(self) -> list[str]:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return list(layer_types[: self.num_layers])
        # Mistral without layer_types: one sliding window for every layer, when set.
        if getattr(self.config, "sliding_window", None) and self.model_type == "mistral":
            return ["sliding_attention"] * self.num_layers
        return ["full_attention"] * self.num_layers
