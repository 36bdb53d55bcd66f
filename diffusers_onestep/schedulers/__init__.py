"""Schedulers for one-step students."""

from .scheduling_consistency_student import ConsistencyStudentScheduler, ConsistencyStudentSchedulerOutput


__all__ = ["ConsistencyStudentScheduler", "ConsistencyStudentSchedulerOutput"]
