"""`mechlora compare`: does the localized choice of layers beat the alternatives? Every arm
trained for every seed at one budget, evaluated on one held-out file, compared with seed-level
statistics (docs/compare.md)."""

from mechlora.compare.arms import ARMS_HELP, Arm, parse_arms
from mechlora.compare.run import DEFAULT_ARMS, SCHEMA_VERSION, CompareResult, compare

__all__ = ["ARMS_HELP", "DEFAULT_ARMS", "SCHEMA_VERSION", "Arm", "CompareResult", "compare",
           "parse_arms"]
