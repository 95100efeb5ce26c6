"""Build a ready model (weights, config, tokenizer, generation defaults) from a checkpoint path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lamina.config import ModelConfig, parse_dtype
from lamina.formats import gguf as gguf_format
from lamina.formats import hf
from lamina.loading.resolve import resolve_model
from lamina.loading.tokenizer import Tokenizer
from lamina.models.llama import LlamaForCausalLM
from lamina.quant import autoawq
from lamina.quant.checkpoint import load_quantized, quant_config_of
from lamina.quant.gguf_native import load_gguf_native
from lamina.rope_config import RopeConfig

QUANTIZATION_CHOICES = (None, "gguf")


@dataclass
class LoadedModel:
    path: Path
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer | None  # None: loaded with skip_tokenizer_init (token ids only)
    generation_config: dict[str, Any] = field(default_factory=dict)

    def require_tokenizer(self, what: str) -> Tokenizer:
        """The tokenizer, or a ValueError when the model was loaded without one."""
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, but {self.path} was loaded without one "
                "(skip_tokenizer_init)"
            )
        return self.tokenizer


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    rope_scaling: str | dict[str, Any] | None = None,
    quantization: str | None = None,
    tokenizer: str | Path | None = None,
    skip_tokenizer_init: bool = False,
) -> LoadedModel:
    """Load a Hugging Face folder or a GGUF file (None: the default SmolLM2 GGUF).

    tokenizer: take the tokenizer from this Hugging Face folder or .gguf file instead of the
    model's own (vLLM's `tokenizer=`); its ids must fit the model's vocabulary.

    skip_tokenizer_init: read no tokenizer at all (`LoadedModel.tokenizer` is None), so a folder
    with only config.json and weights loads; the engine then takes token ids only. Without it,
    a folder that has no tokenizer.json is an error that says so before the weights load.

    rope_scaling overrides the checkpoint's RoPE scheme (JSON text or a dict, see
    `RopeConfig.from_user`).

    quantization: None dequantizes a GGUF's weights to `dtype`; "gguf" runs its Q8_0 / Q4_0 /
    Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K decoder linears natively (lamina.quant.gguf_native).
    AutoAWQ (GEMM) folders are recognised from their config and always load as int4.

    dtype "auto" follows `config.auto_dtype()` (bfloat16 on CPUs with bf16 kernels).
    """
    path = resolve_model(model)
    torch_dtype = parse_dtype(dtype)
    if skip_tokenizer_init and tokenizer is not None:
        raise ValueError(
            f"tokenizer={str(tokenizer)!r} and skip_tokenizer_init=True contradict each other; "
            "give one of them"
        )
    override = None if tokenizer is None else load_tokenizer(tokenizer)  # before the weights
    # --- native quantized loading (gguf_native / autoawq) ---
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"unknown quantization {quantization!r}; accepted: {QUANTIZATION_CHOICES} "
            "(None dequantizes GGUF weights to the model dtype)"
        )
    if quantization == "gguf" and path.is_dir():
        raise ValueError(f'quantization="gguf" needs a .gguf file; {path} is a folder')
    # --- end native quantized loading ---
    if path.is_dir():
        config = _override_rope(hf.load_hf_config(path), rope_scaling)
        tok = None if skip_tokenizer_init else _own_or(override, config, tokenizer)
        if tok is None and not skip_tokenizer_init:
            _check_has_tokenizer(path)
            tok = Tokenizer.from_hf_folder(path)
        net = LlamaForCausalLM(config, torch_dtype)
        qcfg = quant_config_of(path)
        awq = autoawq.awq_config_of(path)  # AutoAWQ GEMM checkpoint (raises for others)
        if qcfg is not None:  # written by lamina.quant.save_quantized
            load_quantized(net, path, qcfg)
        elif awq is not None:
            autoawq.load_autoawq(net, path, awq)
        else:
            net.load_weights(hf.iter_safetensors(path))
        gen = hf.load_generation_config(path)
    else:
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a folder")
        reader = gguf_format.open_gguf(path)
        config = _override_rope(gguf_format.gguf_config(reader), rope_scaling)
        tok = None if skip_tokenizer_init else _own_or(override, config, tokenizer)
        if tok is None and not skip_tokenizer_init:
            tok = Tokenizer.from_gguf(reader)
        net = LlamaForCausalLM(config, torch_dtype)
        if quantization == "gguf":
            load_gguf_native(net, reader, config, torch_dtype)
        else:
            net.load_weights(gguf_format.iter_gguf_tensors(reader, config, torch_dtype))
        gen = {}
        del reader
    net.eval()
    return LoadedModel(path=path, config=config, model=net, tokenizer=tok, generation_config=gen)


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face folder (tokenizer.json) or of a .gguf file."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer={str(source)!r} is invalid: {path} has no tokenizer.json")
        return Tokenizer.from_hf_folder(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return Tokenizer.from_gguf(gguf_format.open_gguf(path))
    raise ValueError(
        f"tokenizer={str(source)!r} is invalid: it is neither a Hugging Face folder nor a "
        ".gguf file"
    )


def _check_has_tokenizer(folder: Path) -> None:
    """A model folder without tokenizer.json: say what to do, before any weight is read."""
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"{folder} has no tokenizer.json, so its text cannot be tokenized. To run it on "
            "token ids alone, pass skip_tokenizer_init=True (--skip-tokenizer-init); to take "
            "the tokenizer from elsewhere, pass tokenizer=FOLDER_OR_GGUF (--tokenizer). "
            "lamina reads Hugging Face 'fast' tokenizers (tokenizer.json); convert a slow one "
            "with transformers' AutoTokenizer(...).save_pretrained(folder)."
        )


def _own_or(override: Tokenizer | None, config: ModelConfig, source: object) -> Tokenizer | None:
    """The `tokenizer=` override, checked against the model's vocabulary (None: none given)."""
    if override is not None and override.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer={str(source)!r} is invalid: it has {override.vocab_size} ids but the "
            f"model's vocabulary holds {config.vocab_size}; use a tokenizer of the model's "
            "vocabulary"
        )
    return override


def _override_rope(config: ModelConfig, rope_scaling: str | dict[str, Any] | None) -> ModelConfig:
    if rope_scaling is None:
        return config
    return dataclasses.replace(config, rope=RopeConfig.from_user(rope_scaling, config.rope))
