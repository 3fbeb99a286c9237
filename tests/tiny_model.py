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


def random_llama(folder: Path, seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM with random weights, saved to `folder` as safetensors; returns the HF model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # Random init is too flat for greedy decoding to be stable; sharpen it so near-ties are rare.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def build_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A servable tiny model: random Llama weights plus a tokenizer and chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    random_llama(folder, seed, vocab_size=build_tokenizer(folder), **overrides)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_llama(Path(sys.argv[1])))
