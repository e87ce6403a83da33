"""The supervisor's outcome rules as a table: the facts of an attempt's end → the typed decision (no process)."""

from __future__ import annotations

import signal

import pytest

from core.states import CANCELLED, FAILED, SUCCEEDED
from worker.gpus import GiB
from worker.outcome import (
    AttemptEnd,
    FinishDecision,
    LeaseLostDecision,
    PreemptedDecision,
    RequeueDecision,
    ResizeDecision,
    decide_outcome,
)

GPU = {"gpu_watched": True, "gpu_total_bytes": 16 * GiB, "gpu_budget_bytes": 4 * GiB, "memory_fraction": 0.25}

CASES = [
    # (facts, decision type, state or reason)
    ({"exit_code": 0}, FinishDecision, SUCCEEDED),
    ({"exit_code": 0, "stop_reason": "cancelled"}, FinishDecision, SUCCEEDED),  # ended before the signal landed
    ({"exit_code": 6, "stop_reason": "cancelled"}, FinishDecision, CANCELLED),
    ({"exit_code": 1, "cancel_requested": True}, FinishDecision, CANCELLED),  # asked after the last poll
    ({"exit_code": 6, "stop_reason": "time_limit"}, FinishDecision, FAILED),
    ({"exit_code": 3, "failed_detail": "bad spec"}, FinishDecision, FAILED),
    ({"exit_code": 42}, FinishDecision, FAILED),
    ({"exit_code": 6}, RequeueDecision, "trainer_terminated"),  # SIGTERM from outside gpuyard
    ({"exit_code": -signal.SIGKILL}, RequeueDecision, "trainer_killed"),  # retried: resumes
    ({"exit_code": -signal.SIGKILL, "kills_in_a_row": 2, "kills_before_oom": 3}, FinishDecision, FAILED),
    ({"exit_code": -signal.SIGKILL, "stop_reason": "lease_lost"}, LeaseLostDecision, None),
    ({"exit_code": 6, "stop_reason": "preempted", "preempted_by": "job_hi"}, PreemptedDecision, "job_hi"),
    ({"exit_code": -signal.SIGKILL, "stop_reason": "preempted", "preempted_by": "job_hi"}, PreemptedDecision, "job_hi"),
    ({"exit_code": 0, "stop_reason": "preempted", "preempted_by": "job_hi"}, FinishDecision, SUCCEEDED),
    ({"exit_code": 6, "stop_reason": "preempted", "cancel_requested": True}, FinishDecision, CANCELLED),
    # out of GPU budget: resized once, when the peak fits and attempts are left
    (
        {**GPU, "exit_code": -9, "stop_reason": "memory_budget_exceeded", "gpu_exceeded_bytes": 5 * GiB},
        ResizeDecision,
        0.5,
    ),
    ({**GPU, "exit_code": 5, "gpu_peak_bytes": 6 * GiB}, ResizeDecision, 0.5),
    ({**GPU, "exit_code": 5, "gpu_peak_bytes": 6 * GiB, "resized_before": True}, FinishDecision, FAILED),
    ({**GPU, "exit_code": 5, "gpu_peak_bytes": 6 * GiB, "attempts": 3, "max_attempts": 3}, FinishDecision, FAILED),
    ({**GPU, "exit_code": 5, "gpu_peak_bytes": 20 * GiB}, FinishDecision, FAILED),  # bigger than any GPU
    ({"exit_code": 5}, FinishDecision, FAILED),  # no watchdog: nothing to resize from
    ({"exit_code": -9, "stop_reason": "host_memory_exceeded", "host_limit_bytes": GiB}, FinishDecision, FAILED),
]


@pytest.mark.parametrize(("facts", "kind", "expected"), CASES)
def test_decide_outcome(facts: dict[str, object], kind: type, expected: object) -> None:
    decision = decide_outcome(AttemptEnd(**facts))  # type: ignore[arg-type]
    assert isinstance(decision, kind), decision
    if isinstance(decision, FinishDecision):
        assert decision.state == expected
    elif isinstance(decision, RequeueDecision):
        assert decision.reason == expected
    elif isinstance(decision, PreemptedDecision):
        assert decision.by == expected and "checkpoint" in decision.detail
    elif isinstance(decision, ResizeDecision):
        assert decision.memory_fraction == expected and decision.event()["memory_fraction_from"] == 0.25


def test_the_details_name_the_numbers() -> None:
    oom = decide_outcome(AttemptEnd(-signal.SIGKILL, kills_in_a_row=2, kills_before_oom=3, peak_rss_bytes=2**30))
    assert isinstance(oom, FinishDecision) and oom.reason == "out_of_memory" and "3 times" in (oom.detail or "")
    failed = decide_outcome(AttemptEnd(5, **{**GPU, "gpu_peak_bytes": 6 * GiB, "resized_before": True}))
    assert isinstance(failed, FinishDecision) and "resized once already" in (failed.detail or "")
    budget = decide_outcome(
        AttemptEnd(-9, stop_reason="memory_budget_exceeded", gpu_exceeded_bytes=5 * GiB, **{**GPU, "max_attempts": 1})
    )
    assert isinstance(budget, FinishDecision) and "5120 MiB" in (budget.detail or "")
