"""Flax linen modules: attention on the Pallas kernels, Monarch layers, mixture of experts."""
