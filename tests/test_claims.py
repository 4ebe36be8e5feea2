"""Claims of the papers checked over seeds: intervals and verdicts."""

import math

import pytest

from mkfast.claims import (
    CONTROL_FAILS,
    CONTROL_HOLDS,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    mean_interval,
    paired_claim,
    verdict,
)


def test_t_interval_matches_the_textbook_value():
    # mean 2, sample sd 1, n = 3: half width t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    mean, low, high = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert low == pytest.approx(2.0 - 2.4841, abs=1e-3) and high == pytest.approx(2.0 + 2.4841, abs=1e-3)


def test_one_seed_has_no_interval_and_no_verdict():
    mean, low, high = mean_interval([0.5])
    assert mean == 0.5 and math.isnan(low) and math.isnan(high)
    assert paired_claim("P", "c", "a vs b", [0.9], [0.1])["verdict"] == INCONCLUSIVE


def test_verdicts_follow_the_claimed_direction():
    assert verdict(0.1, 0.3) == REPRODUCED
    assert verdict(-0.3, -0.1) == NOT_REPRODUCED
    assert verdict(-0.1, 0.3) == INCONCLUSIVE
    assert verdict(-0.3, -0.1, higher_is_better=False) == REPRODUCED  # a loss that dropped


def test_paired_claim_measures_per_seed_differences():
    row = paired_claim("RA-CM3", "retrieval helps", "K=2 vs none", [0.80, 0.82, 0.81], [0.50, 0.53, 0.52])
    assert row["verdict"] == REPRODUCED and row["measured"] == "+0.293" and row["seeds"] == 3
    with pytest.raises(ValueError, match="one value per seed"):
        paired_claim("P", "c", "a", [1.0, 2.0], [1.0])


def test_a_control_is_judged_by_whether_the_arms_differ():
    same = paired_claim("P", "control", "a vs b", [0.50, 0.52, 0.49], [0.51, 0.50, 0.50],
                        expect_no_difference=True)
    assert same["verdict"] == CONTROL_HOLDS
    for treatment in ([0.80, 0.82, 0.81], [0.20, 0.22, 0.21]):  # either side fails the control
        row = paired_claim("P", "control", "a vs b", treatment, [0.50, 0.53, 0.52], expect_no_difference=True)
        assert row["verdict"] == CONTROL_FAILS
