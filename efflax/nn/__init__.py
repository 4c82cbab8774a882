"""Flax linen modules: attention on the Pallas kernels, Monarch layers, mixture of experts."""

from efflax.nn.attention import MultiHeadAttention
from efflax.nn.attention import apply_rotary_embedding
from efflax.nn.attention import dot_product_attention
from efflax.nn.attention import segment_ids_with_padding
