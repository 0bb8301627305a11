"""Cross-validation: plans, runners, the resumable result store, statistics."""

from randkit.cv.api import cross_validate
from randkit.cv.plan import Plan, Trial, make_plan
from randkit.cv.run import CVResult, run_cv

__all__ = ["CVResult", "Plan", "Trial", "cross_validate", "make_plan", "run_cv"]
