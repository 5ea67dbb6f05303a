"""One exception hierarchy for the whole package, so callers catch by category (httpx style)."""

from __future__ import annotations


class PipeWeaverError(Exception):
    """Base class of every error PipeWeaver raises on purpose."""


class SpecError(PipeWeaverError, ValueError):
    """A model, parallelism, hardware or batch description is invalid; the message names the field and the fix."""


class InvalidPlan(PipeWeaverError):
    """A plan failed validation; the message renders the rank-by-step grid with the bad cell marked."""


class DoesNotFit(PipeWeaverError):
    """A workload cannot fit the hardware's memory under the chosen placement."""


class PlannerUnavailable(PipeWeaverError):
    """The planner service cannot be reached (or is shutting down)."""


class PlanRejected(PipeWeaverError):
    """The planner refused a request (bad input); the message carries the field violations."""


class PlanTimeout(PipeWeaverError):
    """No plan arrived before its deadline."""


def require(condition: bool, message: str) -> None:
    """Raise `SpecError(message)` unless `condition` holds; keeps `__post_init__` checks one line each."""
    if not condition:
        raise SpecError(message)
