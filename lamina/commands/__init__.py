"""Sub-commands of `lamina` that build on the loader: quantize, prune."""
