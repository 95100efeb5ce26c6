"""`lamina convert`: a GGUF file -> a Hugging Face folder that transformers (and lamina) load."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from lamina.config import parse_dtype
from lamina.formats import gguf as gguf_format
from lamina.loading.tokenizer import Tokenizer


def convert_gguf_to_hf(
    src: str | Path, out_dir: str | Path, dtype: str = "float32", progress: bool = True
) -> Path:
    """Dequantize every tensor (undoing GGUF's q/k permutation) and write config.json,
    model.safetensors, tokenizer files and generation_config.json into `out_dir`.
    progress: a tqdm bar per tensor on stderr, as AWQ and perplexity show (False: none)."""
    src, out = Path(src), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a file; `lamina convert` takes a .gguf file")
    torch_dtype = parse_dtype(dtype)
    reader = gguf_format.open_gguf(src)
    config = gguf_format.gguf_config(reader)
    tokenizer = Tokenizer.from_gguf(reader)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(1 for t in reader.tensors if gguf_format.hf_name(t.name) is not None)
    tensors = dict(
        tqdm(
            gguf_format.iter_gguf_tensors(reader, config, torch_dtype),
            total=total,
            desc="converting",
            unit="tensor",
            disable=not progress,
            dynamic_ncols=True,
        )
    )
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    if tokenizer.pad_token_id is not None:
        hf_config["pad_token_id"] = tokenizer.pad_token_id
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": hf_config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_hf(out)
    return out
