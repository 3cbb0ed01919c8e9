"""Operations: what a run tells the people who run it (logs, status, metrics, progress)."""
