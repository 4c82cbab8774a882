"""Flax linen modules: attention on the Pallas kernels, Monarch layers, mixture of experts,
learned token merging."""

from efflax._src.nn.attention import MultiHeadAttention
from efflax._src.nn.attention import apply_rotary_embedding
from efflax._src.nn.attention import dot_product_attention
from efflax._src.nn.attention import segment_ids_with_padding
from efflax._src.nn.encoder import DenseFeedForward
from efflax._src.nn.encoder import Encoder
from efflax._src.nn.encoder import EncoderBlock
from efflax._src.nn.moe import MoEFeedForward
from efflax._src.nn.moe import moe_aux_loss
from efflax._src.nn.moe import prune_experts
from efflax._src.nn.monarch import MonarchDense
from efflax._src.nn.monarch import Monarchified
from efflax._src.nn.monarch import ReverseSparsification
from efflax._src.nn.monarch import monarch_params_to_dense
from efflax._src.nn.monarch import monarch_shapes
from efflax._src.nn.monarch import monarchify
from efflax._src.nn.monarch import project_dense_params
from efflax._src.nn.routing import LinearRouter
from efflax._src.nn.routing import Routing
from efflax._src.nn.routing import XMoERouter
from efflax._src.nn.routing import combine
from efflax._src.nn.routing import dispatch
from efflax._src.nn.routing import expert_capacity
from efflax._src.nn.routing import expert_choice
from efflax._src.nn.routing import expert_choice_from_probs
from efflax._src.nn.routing import load_balancing_loss
from efflax._src.nn.routing import multiplicative_jitter
from efflax._src.nn.routing import router_z_loss
from efflax._src.nn.routing import token_choice
from efflax._src.nn.routing import token_choice_from_probs
from efflax._src.nn.token_merging import LearnedTokenMerger
from efflax._src.nn.token_merging import TokenLearner
from efflax._src.nn.token_merging import merge_tokens
