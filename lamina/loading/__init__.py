"""A ready model from a checkpoint path: the loader (which picks the float or quantized reader:
lamina.formats, lamina.quant), tokenizers and chat templates, the default model."""
