"""How a user says what to do to a latent. Shared by the engine, the CLI and the HTTP API.

The spec is validated in two steps: its own fields here (finite value, known mode), and against
a concrete SAE and tower (latent < n_latents, token indices < n_tokens, |value| <= bound) by
`check_against`, because only the engine knows which SAE and tower a request lands on.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

from sae_modules.errors import VlmSteerError

Mode = Literal["pin", "nudge", "mul"]
TokenScope = Literal["all", "cls", "patches"]
Unit = Literal["raw", "max", "mean", "p99"]


class InterventionError(VlmSteerError):
    """A spec that does not fit the SAE or tower it is applied to; `field` names the culprit."""


class Intervention(BaseModel):
    """`pin` sets the latent to `value` (the paper's clamp), `nudge` adds it, `mul` multiplies by it."""

    model_config = ConfigDict(extra="forbid")

    latent: NonNegativeInt
    mode: Mode = "pin"
    value: float
    unit: Unit = Field("raw", description="Scale of `value`: raw activation units, or a multiple of the latent's "
                       "max, mean-when-firing or p99 activation in the SAE's latent statistics (pin and nudge).")
    tokens: TokenScope | list[NonNegativeInt] = Field("all", description="Token scope, or explicit token indices.")

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("value must be a finite number")
        return value

    @field_validator("tokens")
    @classmethod
    def _non_empty(cls, tokens: TokenScope | list[int]) -> TokenScope | list[int]:
        if isinstance(tokens, list) and not tokens:
            raise ValueError("tokens must name at least one token index")
        return tokens

    def check_against(self, n_latents: int, n_tokens: int, value_bound: float, where: str = "") -> None:
        """Raise InterventionError if this spec cannot apply to an SAE of n_latents on n_tokens tokens."""
        if self.unit != "raw":
            raise InterventionError(f"unit {self.unit!r} must be resolved against the SAE's latent statistics "
                                    "before the edit", f"{where}unit")
        if self.latent >= n_latents:
            raise InterventionError(f"latent {self.latent} is out of range: the SAE has {n_latents} latents",
                                    f"{where}latent")
        if abs(self.value) > value_bound:
            raise InterventionError(f"|value| {abs(self.value):g} exceeds the bound {value_bound:g}", f"{where}value")
        if isinstance(self.tokens, list):
            if len(self.tokens) > n_tokens:
                raise InterventionError(f"{len(self.tokens)} token indices for a tower of {n_tokens} tokens",
                                        f"{where}tokens")
            bad = [t for t in self.tokens if t >= n_tokens]
            if bad:
                raise InterventionError(f"token indices {bad[:5]} out of range: the tower has {n_tokens} tokens",
                                        f"{where}tokens")
