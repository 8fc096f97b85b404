"""The Unique Stage Identifier for text-conditioned models (Sec. 4.1.2): stage-tagged prompts.

Every training image of stage k is captioned "a [class noun], [SID_k] stage", with a distinct rare
identifier word per stage (DreamBooth-style); sampling uses the last stage's identifier unless told
otherwise. With SID disabled (the ablation of Table 13) the caption is "a [class noun]", the paper's
standard prompt for classification datasets. The text-to-image models that consume these prompts come
with the Stable Diffusion issue; this is the prompt side only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# short letter strings that are rare in captions (as DreamBooth's "sks"); one per stage
DEFAULT_IDENTIFIERS = ("sks", "zwx", "qkf", "vtj", "pqx", "hgy", "mzl", "bnr")


@dataclass(frozen=True)
class StagePrompts:
    """Captions for ``num_stages`` stages; ``identifiers`` defaults to :data:`DEFAULT_IDENTIFIERS`."""

    num_stages: int
    identifiers: tuple[str, ...] | None = None
    enabled: bool = True

    def __post_init__(self):
        if self.num_stages < 1:
            raise ConfigError(f"need at least one stage, got {self.num_stages}")
        ids = self.identifiers if self.identifiers is not None else DEFAULT_IDENTIFIERS
        object.__setattr__(self, "identifiers", tuple(ids))
        if len(self.identifiers) < self.num_stages:
            raise ConfigError(f"{self.num_stages} stages need as many stage identifiers, got {len(self.identifiers)}")
        if len(set(self.identifiers[:self.num_stages])) != self.num_stages:
            raise ConfigError(f"stage identifiers must be distinct: {self.identifiers[:self.num_stages]}")
        if any(not i or any(c.isspace() for c in i) for i in self.identifiers):
            raise ConfigError("a stage identifier must be one non-empty word")

    def identifier(self, stage: int) -> str:
        if not 0 <= stage < self.num_stages:
            raise ConfigError(f"stage {stage + 1} does not exist: there are {self.num_stages} stages")
        return self.identifiers[stage]

    def prompt(self, class_noun: str, stage: int | None = None) -> str:
        """The caption of ``class_noun`` at ``stage`` (0-based; default: the last stage, as sampling uses)."""
        noun = class_noun.strip()
        if not noun:
            raise ConfigError("a prompt needs a class noun")
        if not self.enabled:
            return f"a {noun}"
        k = self.num_stages - 1 if stage is None else stage
        return f"a {noun}, {self.identifier(k)} stage"

    def prompts(self, class_nouns: list[str], stage: int | None = None) -> list[str]:
        return [self.prompt(n, stage) for n in class_nouns]
