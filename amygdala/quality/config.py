"""The report's thresholds and sizes, in a module light enough for the CLI parser to import
(no torch): the defaults are the original system's numbers, every one can be overridden."""

from __future__ import annotations

from dataclasses import dataclass

from amygdala import AmygdalaError


class QualityError(AmygdalaError):
    """Thresholds that cannot be used together; the message names the flags."""


#: The fields ``amygdala quality`` and ``build --quality-report`` expose as flags, with help.
CLI_FIELDS = {
    "clean_above": "first_pc_variance_ratio above this: clean",
    "fragmented_below": "first_pc_variance_ratio below this: fragmented",
    "redundant_r2": "ridge R^2 on the other concept vectors above this: redundant",
    "ridge_lambda": "ridge penalty of the redundancy fit",
    "single_neuron_cos": "best cosine with one down-projection column above this: essentially one neuron",
}


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds and sizes of the report; the defaults are the original system's numbers."""

    clean_above: float = 0.7  # first_pc_variance_ratio above this: clean
    fragmented_below: float = 0.4  # ... below this: fragmented
    redundant_r2: float = 0.9  # ridge R^2 above this: redundant
    ridge_lambda: float = 0.01
    single_neuron_cos: float = 0.6  # best down-projection column cosine above this: one neuron
    nearest_k: int = 5
    coef_k: int = 5
    top_heads: int = 10
    top_neurons: int = 10
    eigvals_k: int = 20
    geometry_k: int = 20
    loaders: int = 5  # concepts listed per pole of each principal component
    outliers: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.fragmented_below <= self.clean_above <= 1.0:
            raise QualityError(
                f"fragmented_below {self.fragmented_below} / clean_above {self.clean_above}: need "
                "0 <= fragmented_below <= clean_above <= 1", param=("fragmented_below", "clean_above"),
            )
        if not 0.0 < self.redundant_r2 <= 1.0:
            raise QualityError(f"redundant_r2 {self.redundant_r2}: must be in (0, 1]", param="redundant_r2")
        if self.ridge_lambda < 0:
            raise QualityError(f"ridge_lambda {self.ridge_lambda}: must be >= 0", param="ridge_lambda")
        if not 0.0 < self.single_neuron_cos <= 1.0:
            raise QualityError(f"single_neuron_cos {self.single_neuron_cos}: must be in (0, 1]", param="single_neuron_cos")

    def head_k(self, n_heads: int) -> int:
        """How many top heads ``head_concentration`` sums: ``top_heads``, but at most a quarter
        of the heads (at least one), so that it still tells sparse from even on models with
        few heads (the original's 10 of 40; SmolLM2 has 9, where 10 would always give 1.0)."""
        return max(1, min(self.top_heads, n_heads // 4))
