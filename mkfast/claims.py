"""A paper's claim checked against repeated runs: the mean gain, its 95% interval, a verdict.

Each comparison pairs a treatment arm with a control arm run under the same seed (same
data order, same initialisation where the arms share modules), so the gain is measured
per seed and the interval is Student's t over those paired differences. With fewer than
two seeds there is no interval and the verdict is "inconclusive".

Verdicts:
  "reproduced in direction"  the interval lies entirely on the side the paper claims;
  "not reproduced"           the interval lies entirely on the other side;
  "inconclusive"             the interval contains zero.

A control (a comparison where the method predicts no difference, e.g. the memory cut to
classes the generator has seen) gets its own two verdicts instead:
  "consistent with no difference"  the interval contains zero;
  "differs: control fails"         it does not, whichever side it lies on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

REPRODUCED = "reproduced in direction"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
CONTROL_HOLDS = "consistent with no difference"
CONTROL_FAILS = "differs: control fails"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean; low = high = nan with one value."""
    if not values:
        raise ValueError("mean_interval: values must hold at least one number, got none")
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    deviation = math.sqrt(sum((value - mean) ** 2 for value in values) / (count - 1))
    half_width = t.ppf(0.5 + confidence / 2, count - 1) * deviation / math.sqrt(count)
    return mean, mean - half_width, mean + half_width


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if not higher_is_better:
        low, high = -high, -low
    if low > 0:
        return REPRODUCED
    if high < 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def paired_claim(paper: str, claim: str, arms: str, treatment: Sequence[float], control: Sequence[float],
                 higher_is_better: bool = True, unit: str = "", expect_no_difference: bool = False) -> dict:
    """A row of the demo's headline table from per-seed values of two arms.

    treatment[i] and control[i] come from the same seed. The gain is treatment - control
    (for a loss, pass higher_is_better=False: a drop is then the claimed direction).
    expect_no_difference: the row is a control, judged by CONTROL_HOLDS / CONTROL_FAILS.
    """
    if len(treatment) != len(control) or not treatment:
        raise ValueError(f"paired_claim: treatment and control need one value per seed each, got "
                         f"{len(treatment)} and {len(control)}")
    gains = [a - b for a, b in zip(treatment, control, strict=True)]
    mean, low, high = mean_interval(gains)
    judged = verdict(low, high, higher_is_better)
    if expect_no_difference:
        judged = CONTROL_HOLDS if judged == INCONCLUSIVE else CONTROL_FAILS
    # The unit goes with the measured value only: every table shows the interval beside it.
    interval = "n/a (one seed)" if math.isnan(low) else f"[{low:+.3f}, {high:+.3f}]"
    return {"paper": paper, "claim": claim, "arms": arms, "measured": f"{mean:+.3f}{unit}",
            "interval": interval, "verdict": judged, "seeds": len(gains),
            "treatment": list(treatment), "control": list(control)}
