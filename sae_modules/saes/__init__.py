"""SAE variants and the registry that builds one from its config."""

from __future__ import annotations

from sae_modules.saes.base import SAE, SAEConfig, SAEConfigError, SAEInputError, SAEOutput, fire_counts
from sae_modules.saes.batchtopk import BatchTopKSAE
from sae_modules.saes.gated import GatedSAE
from sae_modules.saes.jumprelu import JumpReLUSAE
from sae_modules.saes.matryoshka import MatryoshkaBatchTopKSAE, group_sizes_from_fractions
from sae_modules.saes.relu import ReLUSAE
from sae_modules.saes.topk import TopKSAE

#: cfg.architecture -> the class that implements it.
ARCHITECTURES: dict[str, type[SAE]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
}


def build_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE for `cfg` (W_enc = W_dec^T, unit decoder rows, θ from cfg.threshold)."""
    try:
        cls = ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise SAEConfigError(
            f"architecture {cfg.architecture!r} has no SAE class; known: {sorted(ARCHITECTURES)}"
        ) from None
    return cls(cfg)


__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "ReLUSAE",
    "SAEConfig",
    "SAEConfigError",
    "SAEInputError",
    "SAEOutput",
    "TopKSAE",
    "build_sae",
    "fire_counts",
    "group_sizes_from_fractions",
]
