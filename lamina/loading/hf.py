"""Hugging Face folders: config.json, (sharded) safetensors, generation_config.json.

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

from lamina.config import ModelConfig


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


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
            for name in f.keys():
                yield name, f.get_tensor(name)
