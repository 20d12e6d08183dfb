"""SAE architectures: one module each, registered by name for checkpoint loading."""

from saelib.saes.base import SAE, SAE_REGISTRY, SAEConfig, SAEOutput, load_sae
from saelib.saes.binary import BinaryConfig, BinaryOutput, BinarySAE, topk_target
from saelib.saes.jumprelu import JumpReLUConfig, JumpReLUSAE
from saelib.saes.relu import ReLUConfig, ReLUSAE
from saelib.saes.topk import TopKConfig, TopKSAE, geometric_median

__all__ = [
    "BinaryConfig",
    "BinaryOutput",
    "BinarySAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAE",
    "SAE_REGISTRY",
    "SAEConfig",
    "SAEOutput",
    "TopKConfig",
    "TopKSAE",
    "geometric_median",
    "load_sae",
    "topk_target",
]
