"""When to estimate so that the estimates cost at most a fraction of the training time: :class:`CadenceBudget`.

Plain Python (no torch, no Lightning). The caller tells the budget when every optimizer step starts
(:meth:`~CadenceBudget.on_step`) and how long each estimate took (:meth:`~CadenceBudget.measure`,
:meth:`~CadenceBudget.record`); the budget says which steps are due (:meth:`~CadenceBudget.due`) and, one step
ahead, which step is next (:attr:`~CadenceBudget.next_step`)::

    budget = CadenceBudget(max_overhead=0.05)
    for step, batch in enumerate(loader):
        budget.on_step(step)
        if budget.due(step):
            with budget.measure():
                estimate(model, batch)
        if budget.next_step == step + 1:
            keep_weights_before_this_step()      # e.g. for the curvature along the next update
        train_one_step(model, batch)

**The account.** Every second of training earns ``max_overhead`` seconds of estimate time; every estimate spends its
measured seconds. An estimate starts only when the balance covers its predicted cost, so over a run the estimates
take at most about ``max_overhead`` of the training time. The first estimate (at the first step, usually step 0) is
always made, before any training has paid for it: the balance starts in debt by its cost, and the second estimate
waits until training has paid for both. So a run shorter than the first estimate's cost over ``max_overhead`` holds
that estimate only, and its overhead is that estimate's share; a longer run's realised overhead falls to the budget.
The first estimate is cold (no warm start, first calls into autograd: measured at 1 to 3 times a warm one), so it
predicts the second at ``cold_factor`` of its cost (default one half); from the second on, the predicted cost is an
exponential moving average of the measured costs (``smoothing`` the weight of the newest). The balance never holds
more than one predicted estimate, so a slow stretch (a first step that compiles, a stall) buys at most one early
estimate, never a burst; and an estimate cheaper than predicted leaves no credit behind, so estimates never bunch up
(the realised overhead then stays a little under the budget).

**What counts as training time.** The wall time between consecutive :meth:`~CadenceBudget.on_step` calls, less the
estimates' own seconds and less whatever the caller brackets with :meth:`~CadenceBudget.pause` /
:meth:`~CadenceBudget.resume` (the callback excludes validation that way; checkpointing and epoch ends count as
training). The step time used to plan ahead is the mean of the latest decision window (see below), so a slow first
step after an estimate, or after the start, stops counting once a later window is measured.

**Decisions.** The budget re-plans only at *decision steps*: every due step and the review steps ``a + 1, a + 2,
a + 4, ...`` after the latest estimate at step ``a`` (about ``log2`` of the gap per gap), each time from the
balance, the predicted cost and the latest window's step time. A review never moves :attr:`next_step` to the current
step or before it, and a due step is never reviewed away, so once ``next_step == step + 1`` after
``on_step(step)`` it holds.

**Several processes (DDP).** Every process must take the same decisions, or only some would enter the estimate's
collectives. The decisions depend only on step numbers and on the values passed through ``reduce`` at decision
steps: the seconds of training and of estimates measured by this process since the previous decision. Pass a
``reduce`` that returns values every process agrees on (an all-reduce, e.g. the max: the slowest process's wall
time); it is called at the same steps on every process, with two floats. With one process it is not needed.

**Resume.** :meth:`state_dict` holds plain values (ints, floats, ``None``): the balance, predicted cost, step time,
the planned next step and review, and the seconds measured since the last decision (the step in progress counted up
to the moment of saving). A run resumed from it takes the decisions the uninterrupted run would have taken when the
same steps take the same time.

**Fixed cadence.** With ``max_overhead=None`` the budget makes an estimate at every multiple of ``min_every`` (step 0
included) and still measures the overhead (:attr:`overhead`), so one object serves both modes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["CadenceBudget"]

_STATE = (
    "next_step", "last_step", "every", "num_estimates", "cost", "num_costs", "step_seconds", "balance", "train_seconds",
    "estimate_seconds", "next_review", "inflight", "pending_train", "pending_steps", "pending_estimate",
)


def _ceil_to(step: int, every: int) -> int:
    return -(-step // every) * every


class CadenceBudget:
    """Stretches the cadence of estimates so that they cost at most ``max_overhead`` of the training wall time.

    Args:
        max_overhead: estimate seconds allowed per training second (``0.05``: 5%), a finite positive number; ``None``
            for a fixed cadence (every multiple of ``min_every``).
        min_every: estimates only at multiples of this many steps (so at least this far apart); ``1``: any step.
        max_every: at most this many steps between estimates, even over the budget (so a long run still gets
            estimates; the overhead bound then no longer holds); rounded down to a multiple of ``min_every``.
            ``None``: no cap.
        smoothing: weight of the newest measured cost in the predicted cost of the next estimate, in ``(0, 1]``
            (``1``: the last cost).
        cold_factor: the predicted cost of the second estimate, as a fraction of the first (cold) one's, in
            ``(0, 1]``.
        clock: seconds, monotonic (default ``time.perf_counter``); tests pass a fake one.
        reduce: ``reduce([train_seconds, estimate_seconds]) -> [train_seconds, estimate_seconds]``, called at every
            decision step, on every process at the same steps; must return values all processes agree on (see
            "Several processes" above). ``None``: one process.

    Raises:
        ValueError: for an invalid argument.
    """

    def __init__(
        self,
        max_overhead: float | None = 0.05,
        *,
        min_every: int = 1,
        max_every: int | None = None,
        smoothing: float = 0.5,
        cold_factor: float = 0.5,
        clock: Callable[[], float] = time.perf_counter,
        reduce: Callable[[list[float]], Sequence[float]] | None = None,
    ) -> None:
        if max_overhead is not None and (
            isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float))
            or not math.isfinite(max_overhead) or max_overhead <= 0
        ):
            raise ValueError(f"`max_overhead` must be a finite positive number or None, got {max_overhead!r}.")
        if isinstance(min_every, bool) or not isinstance(min_every, int) or min_every < 1:
            raise ValueError(f"`min_every` must be an integer >= 1, got {min_every!r}.")
        if max_every is not None and (
            isinstance(max_every, bool) or not isinstance(max_every, int) or max_every < min_every
        ):
            raise ValueError(f"`max_every` must be None or an integer >= `min_every` ({min_every}), got {max_every!r}.")
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 < smoothing <= 1:
            raise ValueError(f"`smoothing` must be a number in (0, 1], got {smoothing!r}.")
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.min_every = min_every
        self.max_every = None if max_every is None else max_every // min_every * min_every
        if isinstance(cold_factor, bool) or not isinstance(cold_factor, (int, float)) or not 0 < cold_factor <= 1:
            raise ValueError(f"`cold_factor` must be a number in (0, 1], got {cold_factor!r}.")
        self.smoothing = float(smoothing)
        self.cold_factor = float(cold_factor)
        self.clock = clock
        self.reduce = reduce
        # the agreed state (identical on every process; what state_dict holds)
        self.next_step = 0  # the next estimate: due at the first step >= next_step on the min_every grid
        self.last_step: int | None = None  # step of the latest estimate
        self.every: int | None = None  # steps between the latest two estimates (the effective cadence)
        self.num_estimates = 0
        self.cost: float | None = None  # predicted seconds of the next estimate
        self.num_costs = 0  # estimates whose cost was measured
        self.step_seconds: float | None = None  # training seconds per step, mean of the latest decision window
        self.balance = 0.0  # estimate seconds the budget allows now: max_overhead * training - estimates, <= cost
        self.train_seconds = 0.0  # totals, as agreed at decision steps
        self.estimate_seconds = 0.0
        self.next_review: int | None = None  # the next review step (None: none planned)
        self.inflight = 0.0  # predicted cost of an estimate started at a due step, until the next decision settles it
        # this process's measurements since the latest decision
        self.pending_train = 0.0
        self.pending_steps = 0
        self.pending_estimate = 0.0
        # this process's clock (not state)
        self._seen: int | None = None  # latest step passed to on_step
        self._due: int | None = None  # the step on_step found due
        self._mark: float | None = None  # clock at the latest on_step
        self._excluded = 0.0  # estimate and paused seconds since the mark
        self._started: float | None = None
        self._paused_at: float | None = None

    # ------------------------------------------------------------------ the caller's hooks
    def on_step(self, step: int) -> None:
        """Mark the start of optimizer step ``step`` (before its estimate, if due); later calls for it do nothing.

        Measures the training time of the steps since the previous call, and at decision steps settles the account
        (through ``reduce``) and plans :attr:`next_step`. Steps only go forward; a step below the previous one starts
        a new run there (its first grid step is due; the account, cost and step time carry over).
        """
        if step == self._seen:
            return
        now = self.clock()
        self.resume()
        if self._mark is not None and self._seen is not None and step > self._seen:
            self.pending_train += max(0.0, now - self._mark - self._excluded)
            self.pending_steps += step - self._seen
        elif self._seen is not None and step < self._seen:  # the count went back (a new fit): start over there
            self.next_step, self.last_step, self.next_review, self.inflight = step, None, None, 0.0
        self._seen, self._mark, self._excluded = step, now, 0.0
        due = step >= self.next_step and step % self.min_every == 0
        review = self.max_overhead is not None and self.next_review is not None and step >= self.next_review
        if not (due or review):
            return
        self._settle()
        if due:
            self._due = step
            self.every = None if self.last_step is None else step - self.last_step
            self.last_step = step
            self.num_estimates += 1
            self.inflight = self.cost or 0.0
            self.next_review = step + 1
        else:
            assert self.last_step is not None
            self.next_review = step + max(1, step - self.last_step)  # reviews at a + 1, a + 2, a + 4, ...
        self._plan(step)

    def due(self, step: int) -> bool:
        """Whether an estimate is due at ``step`` (after :meth:`on_step` for it)."""
        return step == self._due

    def start_estimate(self) -> None:
        """The estimate starts now (see :meth:`measure`)."""
        self._started = self.clock()

    def end_estimate(self) -> float:
        """The estimate ends now; returns its seconds (see :meth:`measure`)."""
        if self._started is None:
            raise RuntimeError("CadenceBudget.end_estimate() without start_estimate().")
        seconds = max(0.0, self.clock() - self._started)
        self._started = None
        self.record(seconds)
        return seconds

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Time the estimate in the block (also when it raises): its seconds are spent, not training time."""
        self.start_estimate()
        try:
            yield
        finally:
            self.end_estimate()

    def record(self, seconds: float) -> None:
        """Count ``seconds`` of estimate, spent since the latest :meth:`on_step`, instead of timing it here."""
        self.pending_estimate += float(seconds)
        self._excluded += float(seconds)

    def pause(self) -> None:
        """Stop counting training time (e.g. at validation start) until :meth:`resume` or the next step."""
        if self._paused_at is None:
            self._paused_at = self.clock()

    def resume(self) -> None:
        """Count training time again."""
        if self._paused_at is not None:
            self._excluded += max(0.0, self.clock() - self._paused_at)
            self._paused_at = None

    # ------------------------------------------------------------------ what the caller reads
    @property
    def overhead(self) -> float | None:
        """Estimate seconds per training second so far (as agreed at the latest decision); ``None`` before any."""
        return self.estimate_seconds / self.train_seconds if self.train_seconds > 0 else None

    # ------------------------------------------------------------------ decisions
    def _settle(self) -> None:
        """Agree on the seconds measured since the previous decision and fold them into the account."""
        values = [self.pending_train, self.pending_estimate]
        if self.reduce is not None:
            values = [float(v) for v in self.reduce(values)]
        train, spent = values
        self.train_seconds += train
        self.estimate_seconds += spent
        if self.pending_steps > 0 and train > 0:
            self.step_seconds = train / self.pending_steps
        if spent > 0 and self.num_costs == 0:  # cold (no warm start, first calls): predicts the second at a fraction
            self.cost = self.cold_factor * spent
        elif spent > 0:
            smoothing = 1.0 if self.num_costs < 2 else self.smoothing
            assert self.cost is not None
            self.cost = self.cost + smoothing * (spent - self.cost)
        self.num_costs += int(spent > 0)
        if self.max_overhead is not None:
            if spent > 0:  # an estimate cheaper than predicted leaves no credit: no bunching up
                self.balance = min(self.balance - spent, 0.0)
            self.balance += self.max_overhead * train
            if self.cost is not None:  # at most one estimate's worth of credit
                self.balance = min(self.balance, self.cost)
        self.inflight = 0.0
        self.pending_train, self.pending_steps, self.pending_estimate = 0.0, 0, 0.0

    def _plan(self, step: int) -> None:
        """Set :attr:`next_step`: the first grid step after ``step`` at which the balance covers the next estimate."""
        assert self.last_step is not None
        earliest = _ceil_to(max(step + 1, self.last_step + self.min_every), self.min_every)
        f = self.max_overhead
        if f is None:
            self.next_step = earliest
            return
        if not self.step_seconds:  # no training step measured yet: decide after the next review
            assert self.next_review is not None
            target = self.next_review + 1
        else:  # an estimate whose cost was never measured (none recorded) is tried again as soon as allowed
            need = (self.cost or 0.0) - (self.balance - self.inflight)
            steps = need / (f * self.step_seconds)
            target = step + (math.ceil(steps * (1 - 1e-9)) if need > 0 else 0)
        target = _ceil_to(max(earliest, target), self.min_every)
        if self.max_every is not None:
            target = max(earliest, min(target, self.last_step + self.max_every))
        self.next_step = target

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values: the account, the plan, and the seconds measured since the latest decision.

        The step in progress counts as one training step up to now (a checkpoint is written after a step's optimizer
        step): the resumed run, which has no clock mark for it, picks up from there.
        """
        state = {k: getattr(self, k) for k in _STATE}
        if self._mark is not None and self._seen is not None:
            paused = self.clock() - self._paused_at if self._paused_at is not None else 0.0
            state["pending_train"] += max(0.0, self.clock() - self._mark - self._excluded - paused)
            state["pending_steps"] += 1
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values; the clock starts again at the next :meth:`on_step`."""
        for k in _STATE:
            setattr(self, k, state[k])
        self._seen, self._due, self._mark, self._excluded = None, None, None, 0.0
        self._started = self._paused_at = None
