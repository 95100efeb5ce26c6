"""Checkpoint file formats, read and written: Hugging Face folders (config.json, safetensors) and
GGUF files. Below everything that fills a model from them (lamina.loading, lamina.quant), so
quantized-checkpoint readers and the model loader share them without importing each other."""
