"""Drop-in optimizers for ``torch.optim``, built from steadygrad's transforms."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .base import Transformed, TransformOptimizer
from .rmsprop import RMSprop

__all__ = ["Adagrad", "Adam", "AdamW", "RMSprop", "TransformOptimizer", "Transformed"]
