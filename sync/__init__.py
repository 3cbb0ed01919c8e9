"""testpress-sync: Testpress exams and attempts into PostgreSQL or SQLite.

Data flows one way through the modules:
config → client (HTTP, auth, retry) → crawler (pagination, concurrency) →
normalize (pure) → writer → store (upserts, runs) → pipeline (one run) → commands → cli.
"""

__version__ = "0.1.0"
