"""A Testpress API simulator: the v2.1 endpoints and the v2.5 admin API over deterministic
generated data.

Used by the tests, the demo and the benchmarks; also runnable on its own
(`testpress-sync simulate`). Two logins: an admin one that reads everything and a student
one that sees its own attempts and gets 403 from the admin API. Faults (throttling, 5xx,
resets, truncated bodies, latency, short-lived tokens, forbidden exams, refused logins,
403 for an expired token) and data changes can be switched at run time.
"""

from sync.simulator.data import Dataset, Faults
from sync.simulator.server import SimulatorServer, create_app

__all__ = ["Dataset", "Faults", "SimulatorServer", "create_app"]
