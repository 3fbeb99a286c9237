"""A tiny Llama with random weights and a small BPE tokenizer, built by the tests in a second or two.

Saved as a normal Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template), so the server loads it exactly as it loads a real model.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Hello, world! This is a tiny model for tests.",
    "Once upon a time there was a small server that spoke ZeroMQ.",
    "def add(a, b): return a + b",
] * 20


def build_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
    }))
    return tok.get_vocab_size()


# Tiny versions of each family we serve, shaped like the real ones where it matters: GQA with an odd
# group (9/3 heads as in SmolLM2), qkv bias (Qwen2), q/k norm with a head_dim unrelated to hidden_size
# (Qwen3), tied or untied embeddings. Vocab and MLP widths are not all even, so TP shards differ in size.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )),
    "smollm2": ("LlamaConfig", dict(
        vocab_size=256, hidden_size=144, intermediate_size=99, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=100000.0,
        bos_token_id=1, eos_token_id=2,
    )),
    "qwen2": ("Qwen2Config", dict(
        vocab_size=251, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=1000000.0,
        bos_token_id=1, eos_token_id=2,
    )),
    "qwen3": ("Qwen3Config", dict(
        vocab_size=256, hidden_size=64, head_dim=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=1000000.0,
        bos_token_id=1, eos_token_id=2,
    )),
    "mistral": ("MistralConfig", dict(
        vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )),
}


def random_model(folder: Path, family: str = "llama", seed: int = 0, jitter_vectors: bool = True, **overrides):
    """A tiny model of one of `FAMILIES` with random weights, saved to `folder` as safetensors; returns the HF model."""
    import torch
    import transformers

    config_class, defaults = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**defaults, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Random init is too flat for greedy decoding to be stable; sharpen it so near-ties are rare.
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        if jitter_vectors:
            # Norm weights start at one and biases at zero, which would hide a vector loaded wrongly (a
            # dropped bias, a q_norm in the wrong order). Its own generator: the matrices stay as seeded.
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def random_llama(folder: Path, seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with random weights, saved to `folder` as safetensors; returns the HF model.
    Norms stay at one, so the served tiny model and the parity tests keep the weights they always had."""
    return random_model(folder, "llama", seed, jitter_vectors=False, **overrides)


def build_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A servable tiny model: random Llama weights plus a tokenizer and chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    random_llama(folder, seed, vocab_size=build_tokenizer(folder), **overrides)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(Path(sys.argv[1])))
