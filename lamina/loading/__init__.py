"""Checkpoint loading: Hugging Face folders and GGUF files, plus the default model."""
