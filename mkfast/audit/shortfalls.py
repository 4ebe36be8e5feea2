"""The one table of known shortfalls: kernels that do not meet a rule of the sm_90a audit yet.

Each row: kernel, config and rule as the audit prints them, the measured figure (ptxas
sm_90a static), why, and the Triton minor version it was measured with: code generation
differs between Triton releases (the GPU machines run 3.6, this repository's venv 3.8),
so a row applies only under its version. The gate (tests/test_audit.py) fails on a
violation missing here and on an applicable row whose violation no longer occurs or whose
figure changed, so the table stays true: update it from ``mkfast audit`` output when a
kernel changes.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shortfall:
    kernel: str
    config: str
    rule: str
    figure: str
    reason: str
    triton: str  # "3.8": the Triton minor version the figure was measured with

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kernel, self.config, self.rule)


def minor_version(version: str) -> str:
    return ".".join(version.split(".")[:2])


SHORTFALLS: tuple[Shortfall, ...] = ()


def applicable(triton_version: str) -> list[Shortfall]:
    """The rows measured with this Triton minor version."""
    return [row for row in SHORTFALLS if row.triton == minor_version(triton_version)]
