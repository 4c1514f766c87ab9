"""Shared fixtures: tiny random models of every supported architecture, saved locally.

Tiny random models test the mechanics (layer plumbing, masks, heads, batching); the real
SmolLM2 tests (marked ``real``) test behaviour on real weights and data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf

TINY = dict(num_hidden_layers=4, num_attention_heads=4)


def _tiny_configs(vocab: int) -> dict:
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **TINY, **common),
        "qwen2": tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **TINY, **common),
        "mistral": tf.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, sliding_window=6, **TINY, **common),
        "gemma3_text": tf.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=6,
            final_logit_softcapping=5.0, **TINY, **common,
        ),
        "gpt2": tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common),
        "opt": tf.OPTConfig(
            hidden_size=32, ffn_dim=64, max_position_embeddings=128, word_embed_proj_dim=16, **TINY, **common,
        ),
    }


ARCHITECTURES = list(_tiny_configs(10))
# Policy files written before the option signals and the guarantee (SmolLM2's, paper's five
# features, agreement criterion): they must keep loading and deciding as they did.
POLICIES_BEFORE_OPTION_SIGNALS = Path(__file__).parent / "fixtures" / "policies_paper_features"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [
        "the quick brown fox jumps over the lazy dog . a film that is great , a movie that is bad .",
        "question : what is the answer ? answer : yes no maybe positive negative",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """{architecture: folder with a tiny random model and tokenizer}."""
    root = tmp_path_factory.mktemp("tiny_models")
    tokenizer = _tiny_tokenizer()
    dirs = {}
    for i, (name, config) in enumerate(_tiny_configs(len(tokenizer)).items()):
        torch.manual_seed(1000 + i)
        model = tf.AutoModelForCausalLM.from_config(config)
        # Random init gives near-uniform predictions; sharpen the head so that exit
        # features spread over a useful range and policies really stop at various layers.
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(8.0)
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[name] = folder
    return dirs


@pytest.fixture(scope="session")
def tiny_models(tiny_model_dirs) -> dict:
    return {
        name: tf.AutoModelForCausalLM.from_pretrained(folder).eval() for name, folder in tiny_model_dirs.items()
    }


@pytest.fixture
def one_thread():
    """Torch at one thread for the test: tiny matrices gain nothing from threads, and OpenMP
    threads spin badly when the CPUs are shared (a 4x4 matmul then takes ~20 ms)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
