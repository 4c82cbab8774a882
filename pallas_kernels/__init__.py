"""Pallas kernels (GPU-compiled, interpret mode on CPU): FlashAttention and Monarch matmuls."""
