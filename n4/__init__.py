"""N4 (Nova-Nox Neural Network) and the decoder shared by every ablation variant."""

from n4.config import ModelConfig
from n4.model import CausalLM
from n4.published import N4C

__all__ = ["ModelConfig", "CausalLM", "N4C"]
