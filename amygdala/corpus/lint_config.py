"""The lint's thresholds, in their own module so loader.py stays small (it re-exports the name)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LintConfig:
    """Thresholds of ``amygdala corpus check``; overridable in the manifest's ``[lint]`` table."""

    min_positives: int = 3
    min_settings: int = 2
    trouble_min_positives: int = 5
    trouble_min_settings: int = 3
    trouble_concepts: tuple[str, ...] = ()
    min_words: int = 60
    max_words: int = 200
    direct_min_words: int = 5
    direct_max_words: int = 100
    near_duplicate_jaccard: float = 0.5
    #: Every concept must have valence and arousal in the manifest.
    require_affect: bool = False
    #: No one setting may carry more than this share of a concept's scene texts (1.0: no limit).
    max_setting_share: float = 1.0
