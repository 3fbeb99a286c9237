"""Convert a GGUF file once into a Hugging Face folder (safetensors, config, tokenizer).

Run as `python -m serve.worker.convert SRC.gguf DEST_DIR` by the launcher on the first launch of a GGUF
model. transformers dequantizes GGUF to float32 (tens of seconds); the safetensors written here load in
about two. The folder is written under a temporary name and renamed, so a crash leaves no half cache.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def convert(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        _write(src, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _write(src: Path, tmp: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores no aliases; tied means "same as embed_tokens"
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": src.name})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights on disk are plain float32 now
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
