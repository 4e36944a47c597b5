"""Fixtures of the checks tests: the job tests' volume laid out as `make demo` lays it out."""

from tests.job.conftest import demo_volume

__all__ = ["demo_volume"]
