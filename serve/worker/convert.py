"""A GGUF file's Hugging Face side: config, tokenizer and generation config, written once into a folder.

Run as `python -m serve.worker.convert SRC.gguf DEST_DIR --metadata-only` by the launcher on the first
launch of a GGUF model (a few seconds: the worker reads the weights from the GGUF itself, blocks and all).
Without the flag it also writes the weights dequantized to float32 safetensors (tens of seconds;
transformers does the dequantizing), for tools that want a plain Hugging Face folder: the parity tests
against transformers, and vLLM in `make bench-peers`. The folder is written under a temporary name and renamed,
so a crash leaves no half cache.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path


def convert(src: Path, dest: Path, weights: bool = False) -> None:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        _write(src, tmp, weights)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _read_metadata_once() -> None:
    """transformers parses a GGUF's metadata (its vocabulary too) once for the tokenizer and again for the
    config: ~5 s each for SmolLM2's file here, most of the conversion. Both ask the same question of the
    same file, so the second is answered from the first (a copy: callers may change what they get)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    read, answers = gguf_utils.load_gguf_checkpoint, {}

    def once(path, *args, **kwargs):
        if args or kwargs not in ({}, {"return_tensors": False}):  # the tensors, or a call we do not know
            return read(path, *args, **kwargs)
        if str(path) not in answers:
            answers[str(path)] = read(path, return_tensors=False)
        return copy.deepcopy(answers[str(path)])

    gguf_utils.load_gguf_checkpoint = once  # both callers import it from the module when they run


def _write(src: Path, tmp: Path, weights: bool) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    _read_metadata_once()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if weights:
        from safetensors.torch import save_file

        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # safetensors stores no aliases; tied means "same as embed_tokens"
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": src.name})
        config, generation = model.config, model.generation_config
    else:
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        generation = GenerationConfig.from_model_config(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights, when written, are plain float32
    config.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]), weights="--metadata-only" not in sys.argv[3:])
