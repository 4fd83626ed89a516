"""Register the N4 parts: attention "n4", MLP "asgg" and norm "dyt".

The classes live in the ``n4`` package. They are registered here rather than there because
registering from ``n4`` would make ``n4`` import ``variants`` while ``variants`` imports ``n4``.
"""

from n4.attention import N4Attention
from n4.mlp import ASGG
from n4.norm import DyT
from variants.registry import ATTENTION, MLP, NORM

ATTENTION.register("n4")(N4Attention)
MLP.register("asgg")(ASGG)
NORM.register("dyt")(DyT)
