"""The float32 reordering bound the equivalence tests use (tests/oracles.py) holds for real
float32 sums and is not vacuous: a difference beyond it fails."""
import numpy as np
import pytest

from oracles import U32, assert_reordered_close, reorder_tolerance, sum_bound


@pytest.mark.parametrize("n", [1, 2, 7, 97, 1024, 9216, 65537])
def test_float32_sums_in_any_order_stay_within_the_bound(n, rng):
    for _ in range(20):
        x = (rng.standard_normal(n) * np.exp(rng.standard_normal(n))).astype(np.float32)
        exact = float(np.sum(x.astype(np.float64)))
        magnitude = float(np.sum(np.abs(x.astype(np.float64))))
        for order in (slice(None), slice(None, None, -1), rng.permutation(n)):
            s = np.float32(0)
            if n <= 1024:  # a sequential sum: the order the bound is stated for
                for v in x[order]:
                    s = np.float32(s + v)
            else:          # NumPy's pairwise/blocked sum: another order, within the same bound
                s = np.sum(x[order], dtype=np.float32)
            assert abs(float(s) - exact) <= sum_bound(n) * magnitude


def test_the_probabilistic_bound_is_below_the_worst_case_and_grows_with_depth():
    for n in (10, 1000, 100000):
        worst = n * U32 / (1 - n * U32)
        assert sum_bound(n) < worst or n < 64  # sqrt(n) * lam < n once n > lam^2
        assert reorder_tolerance(n, 3) > reorder_tolerance(n, 1) > 0


def test_a_difference_beyond_the_bound_fails(rng):
    want = rng.standard_normal(1000)
    tol = reorder_tolerance(100, 3)
    assert_reordered_close(want * (1 + 0.5 * tol), want, 100, 3)
    with pytest.raises(AssertionError, match="beyond the float32 reordering bound"):
        assert_reordered_close(want * (1 + 2.5 * tol), want, 100, 3)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_reordered_close(np.full(3, np.nan), np.ones(3), 100, 3)
