"""Paged KV cache: physical block tensors and the block manager that hands them out."""
