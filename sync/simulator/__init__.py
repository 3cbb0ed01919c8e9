"""A Testpress API simulator: the v2.1 endpoints over deterministic generated data.

Used by the tests, the demo and the benchmarks; also runnable on its own
(`testpress-sync simulate`). Faults (throttling, 5xx, resets, truncated bodies, latency,
short-lived tokens, forbidden exams) and data changes can be switched at run time.
"""

from sync.simulator.app import SimulatorServer, create_app
from sync.simulator.data import Dataset, Faults

__all__ = ["Dataset", "Faults", "SimulatorServer", "create_app"]
