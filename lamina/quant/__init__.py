"""Post-training quantization of lamina models: weight-only int8, int4 (RTN and AWQ), and
SmoothQuant W8A8, plus quantized checkpoints that reload bit-exactly.

    from lamina.quant import quantize_model, save_quantized
    quantize_model(loaded.model, "awq", calib_ids, group_size=128)
    save_quantized(loaded.model, loaded.config, loaded.tokenizer, "out/")
    load_model("out/")  # the loader recognises quantization_config and rebuilds the layers

Modules, one job each: int8.py / int4.py / w8a8.py (the quantized linears and their kernels),
fold.py (where per-channel scales can be folded in a LLaMA), calibrate.py (activation
statistics), awq.py and smoothquant.py (the two scaling searches), apply.py (quantize_model),
checkpoint.py (save / load); the `lamina quantize` command is lamina/commands/quantize.py.
"""

from lamina.quant.apply import METHODS, QuantConfig, quantize_model
from lamina.quant.checkpoint import load_quantized, quant_config_of, save_quantized
from lamina.quant.int4 import Int4Linear
from lamina.quant.int8 import Int8Linear
from lamina.quant.w8a8 import W8A8Linear

__all__ = [
    "METHODS",
    "Int4Linear",
    "Int8Linear",
    "QuantConfig",
    "W8A8Linear",
    "load_quantized",
    "quant_config_of",
    "quantize_model",
    "save_quantized",
]
