"""Random pronounceable names, for entities that no text describes (the demos' mechanism checks)."""

from __future__ import annotations

import torch

SYLLABLES = ("ba", "ko", "mi", "ru", "te", "zu", "lo", "pa", "ne", "vi", "go", "shu")


def nonce_names(count: int, generator: torch.Generator, syllables: int = 3,
                separator: str = " ") -> list[str]:
    """``count`` distinct names of ``syllables`` syllables each, drawn from ``generator``."""
    if count > len(SYLLABLES) ** syllables:
        raise ValueError(f"nonce_names: at most {len(SYLLABLES) ** syllables} distinct names of {syllables} "
                         f"syllables, asked for {count}")
    names: dict[str, None] = {}
    while len(names) < count:
        drawn = torch.randint(0, len(SYLLABLES), (syllables,), generator=generator).tolist()
        names.setdefault(separator.join(SYLLABLES[index] for index in drawn))
    return list(names)
