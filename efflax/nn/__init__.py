"""Flax linen modules: attention on the Pallas kernels, Monarch layers, mixture of experts."""

from efflax.nn.attention import MultiHeadAttention
from efflax.nn.attention import apply_rotary_embedding
from efflax.nn.attention import dot_product_attention
from efflax.nn.attention import segment_ids_with_padding
from efflax.nn.encoder import DenseFeedForward
from efflax.nn.encoder import Encoder
from efflax.nn.encoder import EncoderBlock
from efflax.nn.moe import MoEFeedForward
from efflax.nn.moe import moe_aux_loss
from efflax.nn.moe import prune_experts
from efflax.nn.routing import LinearRouter
from efflax.nn.routing import Routing
from efflax.nn.routing import XMoERouter
from efflax.nn.routing import combine
from efflax.nn.routing import dispatch
from efflax.nn.routing import expert_capacity
from efflax.nn.routing import expert_choice
from efflax.nn.routing import expert_choice_from_probs
from efflax.nn.routing import load_balancing_loss
from efflax.nn.routing import multiplicative_jitter
from efflax.nn.routing import router_z_loss
from efflax.nn.routing import token_choice
from efflax.nn.routing import token_choice_from_probs
