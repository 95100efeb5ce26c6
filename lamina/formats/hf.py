"""Hugging Face folders: config.json, (sharded) safetensors, generation_config.json; read, and
written for lamina's quantized and pruned checkpoints.

safetensors files are memory-mapped and tensors are handed out one at a time, so loading never
holds a second full copy of the weights; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lamina.config import ModelConfig


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return data


def load_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    return ModelConfig.from_hf(read_json(path))


def load_generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files, via the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        files = [folder / s for s in shards]
        absent = [str(f.name) for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"shard index names files that are missing: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{folder} holds no *.safetensors weights (pickled .bin checkpoints are not loaded; "
            "convert them to safetensors)"
        )
    return files


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs streamed from memory-mapped safetensors files."""
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, f.get_tensor(name)


WEIGHTS_FILE = "model.safetensors"


def write_hf_folder(
    out_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    tokenizer: Any,
    dtype: torch.dtype,
    extra_config: dict[str, Any],
    metadata: dict[str, str] | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write tensors, config.json (the model's config plus `extra_config`, e.g. a
    quantization or pruning block), generation_config.json and the tokenizer as a folder that
    `load_model` (and, for dense weights, transformers) reads. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", **(metadata or {})})
    hf_config = config.to_hf()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    hf_config.update(extra_config)
    if getattr(tokenizer, "pad_token_id", None) is not None:
        hf_config["pad_token_id"] = tokenizer.pad_token_id
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    gen = dict(generation_config or {})
    gen.setdefault("bos_token_id", config.bos_token_id)
    gen.setdefault("eos_token_id", hf_config["eos_token_id"])
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_hf(out)
    return out
