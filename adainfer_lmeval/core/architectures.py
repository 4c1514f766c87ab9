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

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adainfer_lmeval.errors import AdaInferError
from adainfer_lmeval.core.exit_policy import ModelIdentity

ROTARY_FAMILY = ("llama", "mistral", "qwen2", "gemma3_text")
SUPPORTED_MODEL_TYPES = ROTARY_FAMILY + ("gpt2", "opt")


@dataclass
class LayerInputs:
    """What every layer call needs besides the hidden states, built once per batch shape."""

    position_ids: torch.Tensor
    masks: list[Any]  # one attention mask per layer (None: the causal fast path)
    position_embeddings: list[Any] = field(default_factory=list)  # one per layer (rotary only)

    def select(self, rows: torch.Tensor) -> "LayerInputs":
        """The same inputs for a subset of the batch rows (rows that leave stop needing them)."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return LayerInputs(
            position_ids=self.position_ids[rows],
            masks=[pick(m) for m in self.masks],
            position_embeddings=[(cos[rows], sin[rows]) for cos, sin in self.position_embeddings],
        )


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

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Layer-0 hidden states, exactly as the model's forward builds them.

        ``positions`` ([rows, T]; default 0..T-1): where each token sits in its sequence, for the
        families with learned position embeddings (left-padded or cached generation steps).
        """
        body = self.body
        if self.model_type in ROTARY_FAMILY:
            # Gemma-3's embed_tokens scales by sqrt(hidden) itself.
            return body.embed_tokens(input_ids)
        if positions is None:
            positions = self._positions(input_ids.shape[1], input_ids.device)
        if self.model_type == "gpt2":
            return body.drop(body.wte(input_ids) + body.wpe(positions))
        embeds = body.embed_tokens(input_ids)
        if body.project_in is not None:
            embeds = body.project_in(embeds)
        ones = torch.ones(1, input_ids.shape[1], device=input_ids.device)
        return embeds + body.embed_positions(ones, 0, position_ids=positions)

    def cached_layer_inputs(self, hidden: torch.Tensor, positions: torch.Tensor, start: int, key_valid: torch.Tensor) -> LayerInputs:
        """Masks and position embeddings for ``hidden``'s tokens written at cache slots ``start``..

        For generation with a KV cache over left-padded rows: ``positions`` [rows, q] are the
        tokens' positions in their sequences (padding not counted), ``key_valid`` [rows, start+q]
        says which cache slots hold real tokens. A token attends to the real tokens at or
        before its slot (and within the sliding window on sliding layers); a padding slot
        attends to itself only, so that no row of the softmax is empty.
        """
        queries = hidden.shape[1]
        slots = torch.arange(start + queries, device=hidden.device)
        query_slots = slots[start:].unsqueeze(1)  # [q, 1]
        causal = slots.unsqueeze(0) <= query_slots  # [q, keys]
        own = slots.unsqueeze(0) == query_slots
        allowed = causal.unsqueeze(0) & (key_valid.unsqueeze(1) | own.unsqueeze(0))  # [rows, q, keys]
        kinds = self._mask_kinds()
        built = {}
        for kind in set(kinds):
            mask = allowed
            if kind == "sliding_attention":
                window = self.config.sliding_window
                mask = mask & (query_slots - slots.unsqueeze(0) < window).unsqueeze(0)
            built[kind] = self._mask_format(mask.unsqueeze(1), hidden.dtype)
        masks = [built[kind] for kind in kinds]
        return LayerInputs(position_ids=positions, masks=masks, position_embeddings=self._rope(hidden, positions))

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> list:
        """One rotary (cos, sin) per layer (Gemma-3: per attention kind); empty for other families."""
        kinds = self._mask_kinds()
        if self.model_type == "gemma3_text":
            per_kind = {k: self.body.rotary_emb(hidden, positions, k) for k in set(kinds)}
            return [per_kind[kind] for kind in kinds]
        if self.model_type in ROTARY_FAMILY:
            return [self.body.rotary_emb(hidden, position_ids=positions)] * self.num_layers
        return []

    def _mask_format(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A boolean [rows, 1, q, keys] mask as the model's attention function wants it."""
        if self.config._attn_implementation == "sdpa":
            return allowed  # True = attend
        # eager (and anything else that adds the mask to the scores)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

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
        return LayerInputs(position_ids=positions, masks=masks, position_embeddings=self._rope(hidden, positions))

    def continuation_inputs(self, hidden: torch.Tensor, positions: torch.Tensor) -> LayerInputs:
        """Masks and position embeddings for a few tokens carried on alone (:meth:`continue_from`).

        ``hidden`` [rows, q, d] holds q tokens taken out of longer sequences, ``positions``
        [rows, q] (increasing along q) where each sat there. Each token attends to the carried
        tokens at or before it, and on sliding layers only to those within the window of its
        own position, so rotary embeddings and windows see the tokens where they were.
        """
        queries = hidden.shape[1]
        allowed = torch.ones(queries, queries, dtype=torch.bool, device=hidden.device).tril().expand(len(hidden), -1, -1)
        kinds = self._mask_kinds()
        built = {}
        for kind in set(kinds):
            mask = allowed
            if kind == "sliding_attention":
                mask = mask & (positions.unsqueeze(2) - positions.unsqueeze(1) < self.config.sliding_window)
            built[kind] = self._mask_format(mask.unsqueeze(1), hidden.dtype)
        return LayerInputs(position_ids=positions, masks=[built[kind] for kind in kinds],
                           position_embeddings=self._rope(hidden, positions))

    def continue_from(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Carry layer-``layer`` states of a few tokens through the remaining layers alone.

        SimLens (Ma et al., 2025, arXiv 2507.17618): the start token and the answer position,
        taken out of the prompt after layer ``layer`` and run through layers ``layer+1..L``
        without the rest of it, read the last layer's answer far better than the lens at
        ``layer`` does. ``hidden`` [rows, q, d], ``positions`` [rows, q] as
        :meth:`continuation_inputs` takes them; returns their layer-``num_layers`` states.
        Costs q tokens per remaining layer, against the prompt's T.
        """
        inputs = self.continuation_inputs(hidden, positions)
        for index in range(layer, self.num_layers):
            hidden = self.run_layer(index, hidden, inputs)
        return hidden

    def run_layer(self, index: int, hidden: torch.Tensor, inputs: LayerInputs, cache=None) -> torch.Tensor:
        """Apply decoder layer ``index`` (0-based); returns the hidden state of layer index+1.

        ``cache``: anything with the ``update(keys, values, layer_idx, **kw)`` of transformers'
        caches (see :mod:`.kv_cache`); None runs without one.
        """
        layer = self.layers[index]
        mask = inputs.masks[index]
        use_cache = cache is not None
        if self.model_type in ROTARY_FAMILY:
            return layer(
                hidden,
                attention_mask=mask,
                position_embeddings=inputs.position_embeddings[index],
                position_ids=inputs.position_ids,
                cache=cache,
                use_cache=use_cache,
            )
        if self.model_type == "gpt2":
            return layer(hidden, cache, mask, None, use_cache=use_cache, position_ids=inputs.position_ids)
        return layer(hidden, attention_mask=mask, position_ids=inputs.position_ids, cache=cache, use_cache=use_cache)

    def fill_kv(self, index: int, hidden: torch.Tensor, inputs: LayerInputs, cache) -> None:
        """Write layer ``index``'s keys and values for ``hidden`` into ``cache``, nothing else.

        For a token that exited before this layer: CALM's state propagation (Schuster et al.,
        2022) feeds the exit hidden state to the skipped layer's key/value projections, so
        later tokens have something to attend to there. Costs the K/V projections only.
        """
        layer = self.layers[index]
        rows, queries = hidden.shape[:2]
        if self.model_type in ROTARY_FAMILY:
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (rows, queries, -1, attn.head_dim)
            keys = attn.k_proj(x).view(shape).transpose(1, 2)
            values = attn.v_proj(x).view(shape).transpose(1, 2)
            if self.model_type == "gemma3_text":
                keys = attn.k_norm(keys)
            cos, sin = inputs.position_embeddings[index]
            keys = _rotate(attn, keys, cos, sin)
        elif self.model_type == "gpt2":
            attn = layer.attn
            _, keys, values = attn.c_attn(layer.ln_1(hidden)).split(attn.split_size, dim=2)
            shape = (rows, queries, -1, attn.head_dim)
            keys, values = keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)
        else:  # opt
            attn = layer.self_attn
            x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
            shape = (rows, queries, -1, attn.head_dim)
            keys = attn.k_proj(x).view(shape).transpose(1, 2)
            values = attn.v_proj(x).view(shape).transpose(1, 2)
        cache.update(keys, values, index)

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own final norm and head applied to an intermediate hidden state."""
        return self._softcap(self.head(self.final_norm(hidden)))

    def exit_logits_over(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Exit logits [rows, K] of ``token_ids`` [rows, K] only: the final norm, then K head rows."""
        return self.head_logits_over(self.final_norm(hidden), token_ids)

    def head_logits_over(self, normed: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The head's logits [rows, K] of ``token_ids`` [rows, K] for states already through the final norm."""
        rows, k = token_ids.shape
        # index_select copies whole rows; advanced indexing is several times slower on a CPU
        weight = self.head.weight.index_select(0, token_ids.reshape(-1)).view(rows, k, -1)
        logits = torch.bmm(weight, normed.unsqueeze(-1).to(weight.dtype)).squeeze(-1)
        if self.head.bias is not None:
            logits = logits + self.head.bias[token_ids]
        return self._softcap(logits)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        for module in self._norms:  # the final norm (and OPT's project_out)
            hidden = module(hidden)
        return hidden

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma-3's final logit soft-capping; identity for the other families."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

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

    def kv_matmul_params(self) -> int:
        """Weights multiplied per token to fill one skipped layer's keys and values."""
        layer = self.layers[0]
        if self.model_type == "gpt2":
            return layer.attn.c_attn.weight.numel() * 2 // 3  # the K and V thirds of c_attn
        attn = layer.self_attn
        return attn.k_proj.weight.numel() + attn.v_proj.weight.numel()

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


def _rotate(attention: nn.Module, keys: torch.Tensor, cos, sin) -> torch.Tensor:
    """Rotary position embedding of the keys, with the function of the attention's own module."""
    rotated, _ = sys.modules[type(attention).__module__].apply_rotary_pos_emb(keys, keys, cos, sin)
    return rotated
