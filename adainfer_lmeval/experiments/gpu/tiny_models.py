"""Tiny random models of every supported family (the configs and seeds of tests/conftest.py), built in code."""

from __future__ import annotations

import torch

from adainfer_lmeval.errors import AdaInferError

PARITY_ARCHS = ("llama", "qwen2", "mistral", "gemma3_text", "gpt2", "opt")
SMOKE_ARCHS = ("llama", "gemma3_text", "gpt2", "opt")  # one of each code path in architectures.py
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tiny_tokenizer():
    """A 300-word byte-level BPE trained on the spot (the tokenizer of tests/conftest.py)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["the quick brown fox jumps over the lazy dog . a film that is great , a movie that is bad .",
              "question : what is the answer ? answer : yes no maybe positive negative"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")


def tiny_config(arch: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tiny = dict(num_hidden_layers=4, num_attention_heads=4, **common)
    rotary = dict(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **tiny)
    if arch == "llama":
        return tf.LlamaConfig(**rotary)
    if arch == "qwen2":
        return tf.Qwen2Config(**rotary)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=6, **rotary)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=8, sliding_window=6, final_logit_softcapping=5.0, **rotary)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=16, **tiny)
    raise AdaInferError(f"no tiny config for {arch!r}; choose from {', '.join(PARITY_ARCHS)}")


def tiny_model(arch: str, vocab: int, dtype: torch.dtype, device, seed: int = 1000):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, vocab))
    # A sharpened head spreads predictions (random init is near-uniform), as in tests/conftest.py.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.to(device=device, dtype=dtype).eval()


def random_rows(seed: int, count: int, vocab: int, low: int = 5, high: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
