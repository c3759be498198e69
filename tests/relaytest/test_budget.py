from __future__ import annotations

import pytest

from relayprobe.relaytest.budget import ErrorBudget


def test_postfix_budget_is_spent_before_its_tenth_error() -> None:
    budget = ErrorBudget(max_errors=8, max_syntax_errors=99)
    for _ in range(7):
        budget.record(554)
        assert not budget.spent
    budget.record(454)
    assert budget.spent


def test_exim_budget_counts_syntax_errors_apart() -> None:
    budget = ErrorBudget(max_errors=99, max_syntax_errors=2)
    budget.record(501)
    budget.record(550)
    assert not budget.spent
    budget.record(500)
    assert budget.spent


@pytest.mark.parametrize("code", [220, 250, 251, 354])
def test_successes_cost_nothing(code: int) -> None:
    budget = ErrorBudget(max_errors=1, max_syntax_errors=1)
    budget.record(code)
    assert not budget.spent


def test_reset_starts_a_fresh_session() -> None:
    budget = ErrorBudget(max_errors=1, max_syntax_errors=1)
    budget.record(502)
    assert budget.spent
    budget.reset()
    assert (budget.errors, budget.syntax_errors, budget.spent) == (0, 0, False)
