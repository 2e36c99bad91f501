"""Greedy mixed-precision search: cheapest start, upgrades by error removed per cost, nested budgets, front."""

from __future__ import annotations

import numpy as np
import pytest

from graphquant.analysis.search import (
    POWER_RANGE,
    ErrorModel,
    Option,
    Unit,
    best_upgrade,
    cheaper_step,
    cheaper_steps,
    cheapest,
    greedy,
    pareto_front,
    predicted_error,
    proxy_sums,
    repeated_block,
    separable_gains,
    total,
)


def unit(name: str, w4_error: float, w8_error: float = 0.001) -> Unit:
    """A layer whose float, w8 and w4 options cost 4, 2 and 1 (size the same)."""
    return Unit(
        name,
        (Option("float", 0.0, 4.0, 400), Option("w8", w8_error, 2.0, 200), Option("w4", w4_error, 1.0, 100)),
    )


UNITS = [unit("robust", 0.01), unit("sensitive", 0.5), unit("middle", 0.05)]


def schemes(choice: dict[str, int]) -> dict[str, str]:
    return {u.name: u.options[choice[u.name]].scheme for u in UNITS}


def test_a_loose_budget_keeps_everything_cheapest():
    assert schemes(greedy(UNITS, budget=1.0, gain=1.0)) == {"robust": "w4", "sensitive": "w4", "middle": "w4"}


def test_the_sensitive_unit_is_upgraded_first():
    choice = greedy(UNITS, budget=0.1, gain=1.0)
    assert schemes(choice) == {"robust": "w4", "sensitive": "w8", "middle": "w4"}
    assert predicted_error(UNITS, choice, 1.0) <= 0.1


def test_tighter_budgets_give_nested_choices_with_less_predicted_error():
    previous = None
    for budget in (1.0, 0.1, 0.03, 0.005, 0.0):
        choice = greedy(UNITS, budget, gain=1.0)
        error = predicted_error(UNITS, choice, 1.0)
        assert error <= budget or budget == 0.0
        if previous is not None:
            assert error <= predicted_error(UNITS, previous, 1.0)
            assert all(u.options[choice[u.name]].error <= u.options[previous[u.name]].error for u in UNITS)
        previous = choice
    assert schemes(previous) == {"robust": "float", "sensitive": "float", "middle": "float"}


def test_the_gain_scales_the_prediction():
    choice = cheapest(UNITS)
    assert predicted_error(UNITS, choice, 2.0) == 2.0 * predicted_error(UNITS, choice, 1.0)
    assert total(UNITS, choice, "cost") == 3.0 and total(UNITS, choice, "size") == 300


def test_a_search_from_a_start_never_downgrades():
    start = {"robust": 0, "sensitive": 2, "middle": 2}
    choice = greedy(UNITS, budget=0.06, gain=1.0, start=start)
    assert choice["robust"] == 0 and schemes(choice)["sensitive"] == "w8"


def test_free_upgrades_come_first():
    free = Unit("free", (Option("a", 0.2, 1.0, 10), Option("b", 0.1, 1.0, 10)))
    assert greedy([free, UNITS[1]], budget=0.55, gain=1.0)["free"] == 1


def test_the_best_upgrade_removes_most_predicted_error_per_cost_and_none_is_left_at_float():
    choice = cheapest(UNITS)
    unit, option = best_upgrade(UNITS, choice, gain=1.0)
    assert unit == "sensitive" and option == 1
    assert best_upgrade(UNITS, {name: 0 for name in choice}, gain=1.0) is None


def test_an_anchored_model_keeps_its_power_and_predicts_the_anchor_exactly():
    model = ErrorModel(0.5, power=0.6).anchored((0.04, 0.001, 0.003))
    assert model.power == 0.6 and model.gain * 0.04**0.6 + 0.001 == pytest.approx(0.003)
    # Nothing to anchor to: no proxies, or no error beyond the end-to-end measured parts.
    assert ErrorModel(0.5).anchored((0.0, 0.001, 0.002)) == ErrorModel(0.5)
    assert ErrorModel(0.5).anchored((0.04, 0.003, 0.002)) == ErrorModel(0.5)


def test_the_cheaper_step_downgrades_the_unit_losing_least_per_cost_saved():
    choice = {"robust": 0, "sensitive": 0, "middle": 0}
    stepped, added = cheaper_step(UNITS, choice, gain=1.0)
    # Every float -> w8 step adds 0.001 for 2 saved; float -> w4 of "robust" adds 0.01 for 3 saved: w8 wins.
    assert stepped == {**choice, "robust": 1} and added == pytest.approx(0.001)
    assert cheaper_step(UNITS, {"robust": 2, "sensitive": 2, "middle": 2}, gain=1.0) is None


def test_cheaper_steps_go_down_while_their_added_error_fits_the_allowance():
    choice = {"robust": 0, "sensitive": 0, "middle": 0}
    # float -> w8 adds 0.001 per unit; then robust's w8 -> w4 adds 0.009.
    assert cheaper_steps(UNITS, choice, 1.0, allowance=0.0025) == {**choice, "robust": 1, "sensitive": 1}
    assert cheaper_steps(UNITS, choice, 1.0, allowance=0.003) == {"robust": 1, "sensitive": 1, "middle": 1}
    assert cheaper_steps(UNITS, choice, 1.0, allowance=0.0005) is None


def test_pareto_front_keeps_the_undominated_points_by_cost():
    points = [(0.1, 5.0), (0.2, 3.0), (0.3, 4.0), (0.05, 9.0), (0.2, 3.0)]
    assert pareto_front(points) == [1, 4, 0, 3]


def test_an_end_to_end_error_counts_as_measured_whatever_the_gain():
    measured = Unit("tables", (Option("float", 0.0, 2.0, 200, end_to_end=True), Option("e4", 0.03, 1.0, 100, 0, True)))
    units = [measured, UNITS[0]]
    choice = cheapest(units)
    assert predicted_error(units, choice, 2.0) == 0.03 + 2.0 * 0.01
    assert predicted_error(units, choice, 0.5) == 0.03 + 0.5 * 0.01


def test_upgrades_compare_proxies_through_the_gain():
    """At gain 0.1 the proxy unit's 0.1 is 0.01 of model error: the measured unit's 0.05 goes first."""
    measured = Unit("tables", (Option("float", 0.0, 2.0, 200, end_to_end=True), Option("e4", 0.05, 1.0, 100, 0, True)))
    proxy = Unit("layer", (Option("float", 0.0, 2.0, 200), Option("w4", 0.1, 1.0, 100)))
    choice = greedy([measured, proxy], budget=0.04, gain=0.1)
    assert choice == {"tables": 0, "layer": 1}
    assert greedy([measured, proxy], budget=0.06, gain=1.0) == {"tables": 1, "layer": 0}


def test_the_error_model_fits_a_gain_and_a_power_to_the_measurements():
    """Measured = 0.02 x proxies ** 0.5 (+ the end-to-end part): two samples recover both; one gives the ratio."""
    samples = [(0.01, 0.0005, 0.0005 + 0.002), (0.04, 0.0, 0.004)]
    fitted = ErrorModel(0.5).fitted(samples)
    assert fitted.gain == pytest.approx(0.02) and fitted.power == pytest.approx(0.5)
    alone = ErrorModel(0.5).fitted(samples[1:])
    assert alone.power == 1.0 and alone.gain == pytest.approx(0.1)
    # Growth slower than the least power is clamped to it; no usable sample keeps the model as it was.
    assert ErrorModel(0.5).fitted([(0.01, 0.0, 0.001), (0.1, 0.0, 0.00101)]).power == POWER_RANGE[0]
    assert ErrorModel(0.5).fitted([(0.0, 0.001, 0.002)]) == ErrorModel(0.5)


def test_a_sublinear_model_upgrades_less_than_the_linear_one():
    """At power 0.5 the predicted error of the summed proxies is their root: the same budget allows more of them."""
    linear, root = ErrorModel(1.0), ErrorModel(0.2, power=0.5)
    assert schemes(linear.choose(UNITS, budget=0.05)) == {"robust": "w4", "sensitive": "w8", "middle": "w8"}
    choice = root.choose(UNITS, budget=0.05)
    assert schemes(choice) == {"robust": "w4", "sensitive": "w8", "middle": "w4"}
    assert root.predict(UNITS, choice) == pytest.approx(0.2 * 0.061**0.5)
    assert proxy_sums(UNITS, choice) == pytest.approx((0.061, 0.0))
    assert root.slope(UNITS, choice) == pytest.approx(0.1 * 0.061**-0.5)


def test_a_stack_of_transformer_blocks_repeats_with_the_period_of_one_block():
    # q, k, v, o share a shape; up and down differ: the block is 6 long, though q..o alone repeat with period 1.
    block = ["d", "d", "d", "d", "up", "down"]
    assert repeated_block(["stem", *block * 4, "head"]) == (6, 1, 25)


def test_no_block_repeats_in_a_sequence_of_distinct_keys_or_too_few_repeats():
    assert repeated_block(list("abcdefgh")) is None
    assert repeated_block(list("abab")) is None
    assert repeated_block(list("ababab")) == (2, 0, 6)


def test_separable_gains_recover_planted_row_and_column_gains_from_the_margins():
    proxies = np.array([[1.0, 2.0, 0.5], [3.0, 4.0, 1.0]])
    planted = np.array([0.05, 2.0])[:, None] * np.array([1.0, 3.0, 0.2])[None, :]
    errors = proxies * planted
    np.testing.assert_allclose(separable_gains(proxies, errors.sum(1), errors.sum(0)), planted, rtol=1e-9)
    # Margins measured on different builds add up differently: the gains fit their geometric mean total.
    scaled = separable_gains(proxies, 2 * errors.sum(1), 0.5 * errors.sum(0))
    np.testing.assert_allclose(scaled, planted, rtol=1e-9)
