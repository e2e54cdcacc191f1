"""moeref.em: stopping rules, the monotonicity check, the converged flag, information criteria."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from moeref.em import (
    MIXTOOLS,
    ConvergenceWarning,
    EMError,
    EMOptions,
    EmptyComponentError,
    EStep,
    LikelihoodDecreaseError,
    LikelihoodDecreaseWarning,
    NonFiniteLogLikelihoodError,
    aitken_limit,
    check_loglik_trace,
    entropy,
    find_loglik_decreases,
    information_criteria,
    run_em,
    run_restarts,
    stopping_rule_met,
)


# ------------------------------------------------------------------------------------------
# A toy "EM" whose log-likelihood is known in closed form: L(theta) = -(theta - 1)^2 and the
# update theta <- theta + rate * (1 - theta) converges linearly with rate (1 - rate)^2 in L.
# ------------------------------------------------------------------------------------------


def _toy(xp, rate=0.5, *, nan_at=None):
    def e_step(theta):
        L = -((theta - 1.0) ** 2)
        if nan_at is not None and abs(float(theta) - nan_at) < 1e-12:
            L = L * math.nan
        log_tau = xp.log(xp.asarray([[0.25, 0.75], [0.5, 0.5]], dtype=xp.float64))
        return EStep(loglik=xp.sum(xp.reshape(L, (1,))), log_responsibilities=log_tau)

    def m_step(theta, tau):
        assert tau.shape == (2, 2)
        return theta + rate * (1.0 - theta)

    return e_step, m_step


def _toy_trace(theta0, rate, n):
    thetas = [theta0]
    for _ in range(n):
        thetas.append(thetas[-1] + rate * (1.0 - thetas[-1]))
    return [-((t - 1.0) ** 2) for t in thetas]


def test_run_em_counts_iterations_like_mixtools_and_converges(backend):
    xp = backend.namespace()
    e, m = _toy(xp)
    theta0 = backend.from_numpy(np.asarray(-3.0))
    res = run_em(e, m, theta0, n_samples=2, n_free_parameters=1, options=EMOptions(criterion="increase", tol=1e-8))
    # Delta L at step t is 12 * 0.25^(t-1) (1.1e-8 at t = 16, 2.8e-9 at t = 17) -> first t with Delta <= 1e-8 is t = 17
    expected = _toy_trace(-3.0, 0.5, 17)
    assert res.converged and res.n_iter == 17 and len(res.loglik_trace) == 18
    np.testing.assert_allclose(res.loglik_trace, expected, rtol=1e-15, atol=0)
    assert res.loglik == res.loglik_trace[-1]
    assert res.decreases == ()
    assert "converged" in res.stop_reason and "'increase'" in res.stop_reason
    assert float(backend.to_numpy(res.params)) == pytest.approx(1.0 - 4.0 * 0.5**17)


def test_converged_is_false_when_max_iter_is_hit():
    e, m = _toy(_np_xp())
    with pytest.warns(ConvergenceWarning, match="did not converge in 5 iterations"):
        res = run_em(e, m, np.asarray(-3.0), n_samples=2, n_free_parameters=1, options=EMOptions(max_iter=5))
    assert not res.converged and res.n_iter == 5 and len(res.loglik_trace) == 6
    assert res.stop_reason.startswith("not converged: max_iter=5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = run_em(e, m, np.asarray(-3.0), n_samples=2, n_free_parameters=1, options=EMOptions(max_iter=5, warn_not_converged=False))
    assert not quiet.converged


def test_rule_met_exactly_at_max_iter_counts_as_converged():
    e, m = _toy(_np_xp())
    res = run_em(e, m, np.asarray(-3.0), n_samples=2, n_free_parameters=1, options=EMOptions(criterion="increase", max_iter=17))
    assert res.converged and res.n_iter == 17


def test_decreasing_run_warns_and_records_or_raises():
    e, m = _toy(_np_xp(), rate=-0.5)  # moves away from the maximum: L decreases every step
    with pytest.warns(LikelihoodDecreaseWarning, match=r"decreased at iteration \d") as record:
        res = run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1, options=EMOptions(max_iter=3, warn_not_converged=False))
    assert res.decreases == (1, 2, 3)
    assert len(record) == 3 and "iteration 1: -1.0 -> -2.25" in str(record[0].message)
    with pytest.raises(LikelihoodDecreaseError, match="decreased at iteration 1"):
        run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1, options=EMOptions(on_decrease="raise"))


def test_non_finite_loglik_raises_with_iteration():
    e, m = _toy(_np_xp(), nan_at=0.0)  # theta: -2 -> -0.5 -> 0.25 ... ; NaN when theta hits 0 (from theta0=-1: -1 -> 0)
    with pytest.raises(NonFiniteLogLikelihoodError, match="after EM iteration 1"):
        run_em(e, m, np.asarray(-1.0), n_samples=2, n_free_parameters=1)
    with pytest.raises(NonFiniteLogLikelihoodError, match="at the starting values"):
        run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1)


def test_m_step_degeneracy_error_gets_the_iteration_number():
    e, _ = _toy(_np_xp())

    def m_step(theta, tau):
        raise EmptyComponentError("component 1 has mixing weight 0")

    with pytest.raises(EmptyComponentError, match=r"EM iteration 1 \(M-step\): component 1 has mixing weight 0"):
        run_em(e, m_step, np.asarray(-3.0), n_samples=2, n_free_parameters=1)
    assert issubclass(EmptyComponentError, EMError)


# ------------------------------------------------------------------------------------------
# Stopping rules on contrived traces
# ------------------------------------------------------------------------------------------


def test_absolute_and_increase_rules():
    assert not stopping_rule_met([-10.0], "absolute", 1e-3)
    assert stopping_rule_met([-10.0, -10.0005], "absolute", 1e-3)
    assert not stopping_rule_met([-10.0, -9.99], "absolute", 1e-3)
    assert stopping_rule_met([-10.0, -10.001], "absolute", 1e-3)  # |Delta| <= tol (boundary included)
    # mixtools' rule is signed: any decrease stops it, a large increase does not
    assert stopping_rule_met([-10.0, -11.0], "increase", 1e-8)
    assert not stopping_rule_met([-10.0, -11.0], "absolute", 1e-8)
    assert not stopping_rule_met([-10.0, -9.0], "increase", 1e-8)


def test_relative_rule_has_flexmix_form():
    # |Delta| / (|L| + 0.1) < tol, strict
    assert stopping_rule_met([-100.0, -99.99999], "relative", 1e-6)  # 1e-5 / 100.09999
    assert not stopping_rule_met([-100.0, -99.999], "relative", 1e-6)  # 1e-3 / 100.099
    assert not stopping_rule_met([0.0, 0.1], "relative", 0.5)  # 0.1 / (0.1 + 0.1) = 0.5, not < 0.5
    assert stopping_rule_met([0.0, 0.1], "relative", 0.5000001)


def test_aitken_rule_on_a_linearly_converging_sequence():
    # L_t = L* - c r^t: the Aitken limit is exactly L*, so the rule fires when L* - L_{t-1} < tol
    Lstar, c, r = -50.0, 4.0, 0.9
    trace = [Lstar - c * r**t for t in range(200)]
    first = next(t for t in range(2, 200) if stopping_rule_met(trace[: t + 1], "aitken", 1e-6))
    assert c * r ** (first - 1) < 1e-6 <= c * r ** (first - 2)
    # the plain difference rule stops much earlier during the slow crawl, far from the limit
    first_abs = next(t for t in range(1, 200) if stopping_rule_met(trace[: t + 1], "absolute", 1e-6))
    assert first_abs < first and Lstar - trace[first_abs] > 1e-6
    assert not stopping_rule_met(trace[:2], "aitken", 1.0)  # needs three values
    assert stopping_rule_met([-3.0, -2.0, -2.0], "aitken", 1e-12)  # exactly zero change stops
    assert not stopping_rule_met([-3.0, -2.0, -2.5], "aitken", 10.0)  # a decrease: rate < 0, no limit


def test_aitken_limit_undefined_cases():
    assert aitken_limit(-3.0, -3.0, -2.0) is None  # zero previous increment
    assert aitken_limit(-3.0, -2.0, -0.5) is None  # accelerating: rate 1.5
    assert aitken_limit(-3.0, -2.0, -1.5) == pytest.approx(-1.0)  # rate 1/2: -2 + 0.5 / 0.5


@given(st.floats(-1e4, 1e4), st.floats(1e-3, 1e3), st.floats(0.05, 0.95), st.integers(0, 30))
def test_aitken_limit_recovers_the_limit_of_geometric_sequences_property(Lstar, c, r, t):
    seq = [Lstar - c * r ** (t + j) for j in range(3)]
    assume(c * r ** (t + 2) > 1e-6 * (abs(Lstar) + c))  # increments well above round-off
    limit = aitken_limit(*seq)
    assert limit is not None
    assert limit == pytest.approx(Lstar, rel=0, abs=1e-7 * (abs(Lstar) + c))


@given(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=6), st.floats(0, 10))
def test_absolute_rule_implies_increase_rule_property(trace, tol):
    if stopping_rule_met(trace, "absolute", tol):
        assert stopping_rule_met(trace, "increase", tol)


def test_bad_stopping_arguments():
    with pytest.raises(ValueError, match="criterion must be one of 'absolute', 'increase', 'relative', 'aitken'; got 'abs'"):
        stopping_rule_met([0.0, 1.0], "abs", 1e-8)
    with pytest.raises(ValueError, match="tol must be a finite non-negative float"):
        stopping_rule_met([0.0, 1.0], "absolute", -1.0)
    e, m = _toy(_np_xp())
    with pytest.raises(TypeError, match="options must be an EMOptions record"):
        run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1, options={"tol": 1e-8})
    with pytest.raises(ValueError, match="options.max_iter must be at least 1, got 0"):
        run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1, options=EMOptions(max_iter=0))
    with pytest.raises(ValueError, match="options.on_decrease must be one of 'warn', 'raise'"):
        run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1, options=EMOptions(on_decrease="ignore"))
    with pytest.raises(ValueError, match="options.tol must be a finite non-negative float"):
        run_em(e, m, np.asarray(0.0), n_samples=2, n_free_parameters=1, options=EMOptions(tol=math.nan))
    with pytest.raises(ValueError, match="n_samples must be at least 1"):
        run_em(e, m, np.asarray(0.0), n_samples=0, n_free_parameters=1)


def test_mixtools_preset():
    assert MIXTOOLS == EMOptions(criterion="increase", tol=1e-8, max_iter=10000)


# ------------------------------------------------------------------------------------------
# Monotone-trace detection
# ------------------------------------------------------------------------------------------


def test_contrived_decreasing_trace_is_detected():
    trace = [-100.0, -90.0, -91.0, -85.0, -85.5, -85.5]
    with pytest.warns(LikelihoodDecreaseWarning) as record:
        found = check_loglik_trace(trace)
    assert found == (2, 4)
    assert [str(w.message).split(":")[0] for w in record] == [
        "EM log-likelihood decreased at iteration 2",
        "EM log-likelihood decreased at iteration 4",
    ]
    with pytest.raises(LikelihoodDecreaseError, match=r"decreased at iteration 2: -90.0 -> -91.0"):
        check_loglik_trace(trace, on_decrease="raise")


def test_round_off_level_decrease_is_not_flagged():
    L = -1234.5678
    trace = [L - 1.0, L, L - 5e-13, L]  # a 2-ulp dip, far below 1e4 eps * (|L| + 1) = 2.7e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_loglik_trace(trace) == ()
    assert find_loglik_decreases(trace, rtol=0.0) == (2,)


def test_non_finite_trace_entry_raises():
    with pytest.raises(NonFiniteLogLikelihoodError, match="trace entry 2 is nan"):
        check_loglik_trace([-3.0, -2.0, math.nan])


# ------------------------------------------------------------------------------------------
# Information criteria
# ------------------------------------------------------------------------------------------


def test_information_criteria_sign_convention():
    ic = information_criteria(-66.9, 7, 28, entropy_value=2.5)
    assert ic.aic == pytest.approx(2 * 66.9 + 14)
    assert ic.bic == pytest.approx(2 * 66.9 + 7 * math.log(28))
    assert ic.icl == pytest.approx(ic.bic + 5.0)
    assert ic.entropy == 2.5


def test_entropy_handles_zero_responsibilities(backend):
    tau = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    expected = -(0.5 * math.log(0.5) * 2 + 0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert entropy(backend.from_numpy(tau)) == pytest.approx(expected, rel=1e-14)


def test_result_criteria_use_final_responsibilities():
    e, m = _toy(_np_xp())
    res = run_em(e, m, np.asarray(-3.0), n_samples=2, n_free_parameters=3)
    tau = np.array([[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(res.responsibilities, tau, rtol=1e-15)
    assert res.entropy == pytest.approx(-np.sum(tau * np.log(tau)))
    assert res.aic == pytest.approx(-2 * res.loglik + 6)
    assert res.bic == pytest.approx(-2 * res.loglik + 3 * math.log(2))
    assert res.icl == pytest.approx(res.bic + 2 * res.entropy)


def _np_xp():
    import array_api_compat.numpy as xp

    return xp


# ------------------------------------------------------------------------------------------
# Restarts
# ------------------------------------------------------------------------------------------


def _toy_fit(theta0, *, fail=False):
    """``fit_one`` for run_restarts: EM on the toy from ``theta0`` (L -> 0 from below)."""
    if fail:
        raise EmptyComponentError("component 1 is empty")
    e_step, m_step = _toy(np, rate=0.5)
    res = run_em(e_step, m_step, np.asarray(theta0), n_samples=2, n_free_parameters=1, options=EMOptions(tol=1e-6))
    return res, res.loglik, res.loglik


def test_run_restarts_runs_every_start_and_picks_the_best():
    starts = [3.0, 1.5, -2.0]
    best, results, records = run_restarts(lambda s: _toy_fit(s), starts, [None, None, "d"])
    finals = [r.loglik for r in results]
    assert best == int(np.argmax(finals))
    assert [r.index for r in records] == [0, 1, 2] and [r.start for r in records] == starts
    assert [r.draws for r in records] == [None, None, "d"]
    for rec, res in zip(records, results):
        assert rec.loglik == rec.objective == res.loglik and rec.n_iter == res.n_iter and rec.loglik_trace == res.loglik_trace


def test_run_restarts_first_wins_ties_and_failures_are_recorded():
    best, results, records = run_restarts(lambda s: _toy_fit(s), [2.0, 2.0])
    assert best == 0
    best, results, records = run_restarts(lambda s: _toy_fit(s, fail=s < 0), [-1.0, 2.0])
    assert best == 1 and results[0] is None
    assert records[0].error == "EmptyComponentError: component 1 is empty" and records[0].loglik is None
    with pytest.raises(EmptyComponentError, match="component 1"):
        run_restarts(lambda s: _toy_fit(s, fail=True), [1.0, 2.0])
    with pytest.raises(EmptyComponentError):  # one start: the error propagates unchanged
        run_restarts(lambda s: _toy_fit(s, fail=True), [1.0])
    with pytest.raises(ValueError, match="at least one start"):
        run_restarts(lambda s: _toy_fit(s), [])
    with pytest.raises(ValueError, match="draws has 1 entries but there are 2 starts"):
        run_restarts(lambda s: _toy_fit(s), [1.0, 2.0], [None])


def test_a_single_run_em_result_has_no_restart_records():
    res, _, _ = _toy_fit(2.0)
    assert res.restarts == () and res.best_restart == 0


def test_helpers_refuse_non_finite_and_misshapen_input():
    from moeref.em import check_nonempty_components, entropy, first_true, information_criteria

    w = np.column_stack([np.full(4, 0.5), np.full(4, 0.5)])
    with pytest.raises(ValueError, match=r"weights contains NaN or infinite values \(column 1 sums to nan\)"):
        check_nonempty_components(w * np.array([1.0, np.nan]), 1e-8)
    with pytest.raises(ValueError, match="weights must be 2-dimensional"):
        check_nonempty_components(w[:, 0], 1e-8)
    with pytest.raises(ValueError, match="min_weight must be a finite non-negative float"):
        check_nonempty_components(w, float("nan"))
    with pytest.raises(ValueError, match="responsibilities contains NaN"):
        entropy(np.full((4, 2), np.nan))
    with pytest.raises(TypeError, match="flags must be a 1-D boolean array"):
        first_true(np.array([0, 1]))
    with pytest.raises(ValueError, match="loglik must be a finite Python float"):
        information_criteria(float("nan"), 3, 10)
