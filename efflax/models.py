"""Small reference models built from efflax layers, used by the experiments and notebooks."""

from efflax._src.models.lm import TransformerBlock
from efflax._src.models.lm import TransformerLM
from efflax._src.models.mnist1d import CNN1D
from efflax._src.models.mnist1d import MLP
from efflax._src.models.sampling import generate
from efflax._src.models.vit import ViT
from efflax._src.models.vit import patchify

__all__ = [
    "CNN1D",
    "MLP",
    "TransformerBlock",
    "TransformerLM",
    "ViT",
    "generate",
    "patchify",
]
