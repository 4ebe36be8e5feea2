"""The one table of known shortfalls: kernels that do not meet a rule of the sm_90a audit yet.

Each row: kernel, config (as the audit prints it), rule, the measured figure (as the
audit prints it, ptxas sm_90a static, with MEASURED_WITH's Triton) and why. The gate
(tests/test_audit.py) fails on a violation missing here and on a row whose violation no
longer occurs or whose figure changed, so the table stays true: update it from
``mkfast audit`` output when a kernel changes.
"""

from __future__ import annotations

import dataclasses

MEASURED_WITH = {"triton": "3.8.0"}


@dataclasses.dataclass(frozen=True)
class Shortfall:
    kernel: str
    config: str
    rule: str
    figure: str
    reason: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kernel, self.config, self.rule)


SHORTFALLS: tuple[Shortfall, ...] = ()
