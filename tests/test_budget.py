"""CadenceBudget, driven by a fake clock: no wall-clock timing anywhere."""

from __future__ import annotations

import json
import math
import threading

import pytest

from lightning_curvature.budget import CadenceBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _const(value):
    return lambda step: value


TRAIN, COST = _const(0.010), _const(0.200)  # 10 ms per step, 200 ms per estimate


def run(budget, clock, steps, train=TRAIN, cost=COST, start=0, pause=None, log=None):
    """Train ``steps`` steps from ``start``; returns the estimate steps. ``train(step)`` and ``cost(step)`` are
    seconds; ``pause(step)`` seconds of validation after that step's training (excluded through pause/resume).
    ``log`` collects (step, due, next_step after on_step) per step."""
    done = []
    for step in range(start, start + steps):
        budget.on_step(step)
        due = budget.due(step)
        if log is not None:
            log.append((step, due, budget.next_step))
        if due:
            with budget.measure():
                clock.advance(cost(step))
            done.append(step)
        clock.advance(train(step))
        if pause is not None and pause(step):
            budget.pause()
            clock.advance(pause(step))
            budget.resume()
    return done


def gaps(steps):
    return [b - a for a, b in zip(steps, steps[1:])]


def test_steady_cadence_after_a_charged_first_estimate():
    # 10 ms per step, 200 ms per estimate, 5%: 200 ms is earned in 400 steps
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 3000)
    assert done[0] == 0
    # the step-0 estimate (200 ms) is charged and predicts the second at half its cost: 300 ms to earn first
    assert done[1] == 600
    assert done[2] == 1200  # the second cost 100 ms more than predicted: paid back, then 200 ms earned
    assert set(gaps(done)[2:]) == {400}
    assert budget.every == 400
    assert budget.step_seconds == pytest.approx(0.010)  # the estimates' seconds are not training time
    assert budget.cost == pytest.approx(0.200)


@pytest.mark.parametrize("cold", [0.2, 0.6])
def test_overhead_stays_within_budget_first_estimate_included(cold):
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    seen = []
    for step in range(8000):
        budget.on_step(step)
        if budget.due(step) and budget.num_estimates > 1:
            # training so far (settled at this due step) pays for every estimate, the cold first one included, and
            # for this one as predicted
            seen.append(step)
            assert budget.estimate_seconds + budget.inflight <= 0.05 * budget.train_seconds + 1e-9
        if budget.due(step):
            with budget.measure():
                clock.advance(cold if step == 0 else 0.2)
        clock.advance(0.01)
    assert len(seen) >= 10
    assert budget.overhead == pytest.approx(0.05, rel=0.1)
    assert budget.overhead <= 0.05 + 0.2 / budget.train_seconds  # at most one estimate ahead of the account


def test_cold_first_estimate_then_warm_ones():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 6000, cost=lambda step: 0.6 if step == 0 else 0.2)
    assert done[1] == 1800  # 0.6 s charged, and 0.3 s predicted for the next (no warm cost is known yet)
    assert set(gaps(done)[1:]) == {400}  # from the second estimate on, the warm costs predict


def test_a_run_shorter_than_the_first_estimate_pays_for_holds_it_only():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    assert run(budget, clock, 590) == [0]  # 0.2 s + 0.1 s predicted need 600 steps of 10 ms
    assert budget.estimate_seconds == pytest.approx(0.2) and budget.next_step == 600


def test_costs_that_change():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 20000, cost=lambda step: 0.2 if step < 5000 else 0.4)
    before = [g for a, g in zip(done, gaps(done)) if 1000 < a < 5000]
    after = [g for a, g in zip(done, gaps(done)) if a > 5200]
    assert set(before) == {400}
    assert all(g >= 800 for g in after) and set(after[-5:]) <= {800, 801}  # the debt of the dearer ones, paid back
    assert budget.overhead <= 0.05


def test_slower_training_earns_more_estimates():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 12000, train=lambda step: 0.01 if step < 4000 else 0.02)
    assert set(g for a, g in zip(done, gaps(done)) if 1000 < a < 4000) == {400}
    assert set(g for a, g in zip(done, gaps(done)) if a > 5000) == {200}


def test_cheap_estimates_are_bounded_by_min_every_and_land_on_its_grid():
    clock = FakeClock()
    budget = CadenceBudget(0.05, min_every=100, clock=clock)
    done = run(budget, clock, 1000, cost=_const(0.001))  # affordable every 2 steps
    assert done == list(range(0, 1000, 100))
    clock = FakeClock()
    budget = CadenceBudget(0.05, min_every=100, clock=clock)
    done = run(budget, clock, 5000)  # 400-step gaps fall on the grid of 100
    assert all(s % 100 == 0 for s in done)
    assert set(gaps(done)[2:]) == {400}


def test_cheap_estimates_every_step_do_not_bank_credit():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 200, cost=_const(0.0001))  # one estimate every step is within budget
    assert gaps(done[2:]) == [1] * (len(done) - 3)
    assert budget.balance <= budget.cost + 1e-12


def test_max_every_caps_the_gap():
    clock = FakeClock()
    budget = CadenceBudget(0.05, max_every=250, clock=clock)
    done = run(budget, clock, 2000)
    assert set(gaps(done)) == {250}  # the first gap would be 600
    budget = CadenceBudget(0.05, min_every=100, max_every=250)  # rounded down to the grid
    assert budget.max_every == 200


def test_fixed_cadence_without_max_overhead():
    clock = FakeClock()
    budget = CadenceBudget(None, min_every=100, clock=clock)
    assert run(budget, clock, 450) == [0, 100, 200, 300, 400]
    assert budget.overhead == pytest.approx(4 * 0.2 / (400 * 0.01))  # measured all the same
    fresh = CadenceBudget(None, min_every=100, clock=clock)  # resumed at step 150 without budget state
    assert run(fresh, clock, 100, start=150) == [200]


def test_next_step_is_known_one_step_ahead():
    # costs and step times that vary, so reviews move the plan: whenever a step is due, the step before it knew
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    log = []
    run(budget, clock, 6000, train=lambda s: 0.01 * (1 + (s // 700) % 3), cost=lambda s: 0.1 + 0.05 * (s % 7),
        log=log)
    estimates = [s for s, due, _ in log if due]
    assert len(estimates) > 10
    for (step, _, next_step), (_, due_next, _) in zip(log, log[1:]):
        assert next_step > step
        assert due_next == (next_step == step + 1)


def test_validation_time_is_not_training_time():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 3000, pause=lambda step: 5.0 if step % 50 == 49 else 0.0)
    assert done[:3] == [0, 600, 1200] and set(gaps(done)[2:]) == {400}
    assert budget.step_seconds == pytest.approx(0.01)


def test_a_slow_first_step_buys_at_most_one_early_estimate():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 3000, train=lambda step: 60.0 if step == 0 else 0.01)  # e.g. compilation
    assert done[:2] == [0, 2]  # the 3 s of credit are capped at one estimate
    assert set(gaps(done)[2:]) == {400}


def test_repeated_calls_for_one_step_count_once():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = []
    for step in range(3000):
        for _ in range(4):  # four micro-batches per optimizer step
            budget.on_step(step)
            if budget.due(step) and step not in done:
                with budget.measure():
                    clock.advance(0.2)
                done.append(step)
            clock.advance(0.0025)
    assert done[:3] == [0, 600, 1200] and set(gaps(done)[2:]) == {400}


def test_a_new_run_counting_from_zero_again_starts_with_an_estimate():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    assert run(budget, clock, 1300)[:3] == [0, 600, 1200]
    again = run(budget, clock, 2000)  # a second fit with the same budget: global_step from 0 again
    assert again[0] == 0 and set(gaps(again)[1:]) == {400}  # the account, cost and step time carry over
    fixed = CadenceBudget(None, min_every=100, clock=clock)
    run(fixed, clock, 250)
    assert run(fixed, clock, 250) == [0, 100, 200]


def test_record_is_measure_with_the_callers_seconds():
    a_clock, b_clock = FakeClock(), FakeClock()
    a, b = CadenceBudget(0.05, clock=a_clock), CadenceBudget(0.05, clock=b_clock)
    a_done = run(a, a_clock, 2000)
    b_done = []
    for step in range(2000):
        b.on_step(step)
        if b.due(step):
            b_clock.advance(0.2)
            b.record(0.2)
            b_done.append(step)
        b_clock.advance(0.01)
    assert a_done == b_done


def test_a_failed_estimate_without_seconds_is_tried_again():
    clock = FakeClock()
    budget = CadenceBudget(0.05, clock=clock)
    done = run(budget, clock, 10, cost=_const(0.0))
    assert done[0] == 0 and len(done) >= 4


@pytest.mark.parametrize("at", [1, 2, 3, 517, 800, 801, 1999])
def test_resume_takes_the_same_decisions(at):
    def costs(step):
        return 0.1 + 0.05 * (step % 5)

    def train(step):
        return 0.01 if step < 1000 else 0.013

    clock = FakeClock()
    whole = run(CadenceBudget(0.05, clock=clock), clock, 4000, train=train, cost=costs)

    clock = FakeClock()
    first = CadenceBudget(0.05, clock=clock)
    done = run(first, clock, at, train=train, cost=costs)
    state = first.state_dict()
    state = json.loads(json.dumps(state))  # plain values only
    assert set(type(v) for v in state.values()) <= {int, float, type(None)}
    clock.advance(30.0)  # restart: loading, a new process
    resumed = CadenceBudget(0.05, clock=clock)
    resumed.load_state_dict(state)
    done += run(resumed, clock, 4000 - at, start=at, train=train, cost=costs)
    assert done == whole


def test_processes_agree_through_reduce():
    """Two "processes" (threads) with their own clocks, one training 30% and estimating 50% slower (left alone they
    would plan different gaps): an all-reduce (max) at the decision steps makes them take the same decisions, and
    they call it at the same steps."""
    world = 2
    barrier = threading.Barrier(world, timeout=30)  # decisions that diverge break it instead of hanging
    slots: list[list[float]] = [[], []]
    calls: list[list[int]] = [[], []]
    results: list[list[int]] = [[], []]
    budgets: list[CadenceBudget] = []

    def make(rank):
        clock = FakeClock()

        def reduce(values):
            calls[rank].append(budgets[rank]._seen)
            slots[rank] = list(values)
            barrier.wait()
            out = [max(slots[r][i] for r in range(world)) for i in range(len(values))]
            barrier.wait()
            return out

        budgets.append(CadenceBudget(0.05, clock=clock, reduce=reduce))
        return clock

    clocks = [make(r) for r in range(world)]

    def worker(rank):
        scale, dearer = (1.0, 1.0) if rank == 0 else (1.3, 1.5)
        results[rank] = run(budgets[rank], clocks[rank], 5000,
                            train=lambda s: scale * 0.01 * (1 + 0.1 * math.sin(s)), cost=lambda s: dearer * 0.2)

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert results[0] == results[1] and len(results[0]) > 5
    assert calls[0] == calls[1]
    # decisions only: every due step and about log2(gap) reviews per gap, far fewer than the steps
    assert len(calls[0]) < 20 * len(results[0])
    assert budgets[0].state_dict() == budgets[1].state_dict() | {
        k: budgets[0].state_dict()[k] for k in ("pending_train", "pending_estimate")}


@pytest.mark.parametrize("kwargs", [
    {"max_overhead": 0}, {"max_overhead": -0.1}, {"max_overhead": float("nan")}, {"max_overhead": True},
    {"min_every": 0}, {"min_every": 1.5}, {"max_every": 0}, {"min_every": 10, "max_every": 5}, {"smoothing": 0},
    {"smoothing": 1.5}, {"cold_factor": 0}, {"cold_factor": 1.5}, {"cold_factor": True},
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        CadenceBudget(**kwargs)


def test_end_without_start():
    with pytest.raises(RuntimeError):
        CadenceBudget().end_estimate()
