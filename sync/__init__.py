"""testpress-sync: Testpress exams and attempts into PostgreSQL or SQLite.

Data flows one way through the modules:
config → client (HTTP, auth, retry) → crawler (pagination, concurrency) →
normalize (pure) → store (upserts, runs) → pipeline (one run) → cli (thin shell).
"""

__version__ = "0.1.0"
