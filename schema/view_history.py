"""The dashboard views as earlier revisions made them, frozen: a migration creates the
views of its own revision (schema/views.py holds only the head's), and a downgrade
restores the ones before it."""

from __future__ import annotations

# Expressions whose spelling differs between the dialects.
_DAY = {
    "sqlite": "date(a.date)",
    "postgresql": "CAST(a.date AT TIME ZONE 'UTC' AS DATE)",
}

EXAM_SUMMARY = """
CREATE VIEW exam_summary AS
SELECT
    e.id AS exam_id,
    e.slug,
    e.title,
    e.course,
    COUNT(a.id) AS attempt_count,
    COUNT(DISTINCT a.username) AS distinct_users,
    SUM(CASE WHEN a.state = 'Completed' THEN 1 ELSE 0 END) AS completed_count,
    ROUND(AVG(CASE WHEN a.state = 'Completed' THEN a.score END), 4) AS average_score,
    MAX(CASE WHEN a.state = 'Completed' THEN a.score END) AS best_score,
    CASE WHEN COUNT(a.id) = 0 THEN NULL
         ELSE ROUND(1.0 * SUM(CASE WHEN a.state = 'Completed' THEN 1 ELSE 0 END)
                    / COUNT(a.id), 4)
    END AS completion_rate,
    MIN(a.date) AS first_attempt_at,
    MAX(a.date) AS last_attempt_at
FROM exams e
LEFT JOIN attempts a ON a.exam_id = e.id AND a.deleted_at IS NULL
WHERE e.deleted_at IS NULL
GROUP BY e.id, e.slug, e.title, e.course
"""

USER_RESULTS = """
CREATE VIEW user_results AS
SELECT
    a.username,
    MAX(a.user_id) AS user_id,
    e.id AS exam_id,
    e.slug AS exam_slug,
    e.title AS exam_title,
    e.course,
    COUNT(a.id) AS attempt_count,
    SUM(CASE WHEN a.state = 'Completed' THEN 1 ELSE 0 END) AS completed_count,
    MAX(CASE WHEN a.state = 'Completed' THEN a.score END) AS best_score,
    ROUND(AVG(CASE WHEN a.state = 'Completed' THEN a.score END), 4) AS average_score,
    MAX(CASE WHEN a.state = 'Completed' THEN a.percentage END) AS best_percentage,
    MIN(CASE WHEN a.state = 'Completed' THEN a.rank END) AS best_rank,
    MAX(a.date) AS last_attempt_at
FROM attempts a
JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL
WHERE a.deleted_at IS NULL
GROUP BY a.username, e.id, e.slug, e.title, e.course
"""

_ATTEMPTS_PER_DAY = """
CREATE VIEW attempts_per_day AS
SELECT
    {day} AS day,
    a.exam_id,
    COUNT(a.id) AS attempt_count,
    COUNT(DISTINCT a.username) AS distinct_users,
    SUM(CASE WHEN a.state = 'Completed' THEN 1 ELSE 0 END) AS completed_count
FROM attempts a
JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL
WHERE a.deleted_at IS NULL AND a.date IS NOT NULL
GROUP BY {day}, a.exam_id
"""

def views_0001(dialect: str) -> list[str]:
    """The CREATE VIEW statements of revision 0001."""
    return [EXAM_SUMMARY, USER_RESULTS, _ATTEMPTS_PER_DAY.format(day=_DAY[dialect])]


# As 0002 made it; 0006 leaves out the attempts of deleted exams.
STUDENT_SUBJECTS_0002 = """
CREATE VIEW student_subjects AS
SELECT
    a.user_id,
    COALESCE(MAX(u.username), MAX(a.username)) AS username,
    s.subject_id,
    s.subject_name,
    COUNT(DISTINCT s.attempt_id) AS attempt_count,
    SUM(s.total_count) AS questions,
    SUM(s.correct_count) AS correct,
    CASE WHEN SUM(s.total_count) > 0 THEN ROUND(1.0 * SUM(s.correct_count) / SUM(s.total_count), 4) END
        AS correct_ratio,
    ROUND(AVG(s.score), 4) AS average_score
FROM attempt_subjects s
JOIN attempts a ON a.id = s.attempt_id AND a.deleted_at IS NULL
LEFT JOIN users u ON u.user_id = a.user_id
GROUP BY a.user_id, CASE WHEN a.user_id IS NULL THEN a.username END, s.subject_id, s.subject_name
"""


def views_0002(dialect: str) -> list[str]:
    """The CREATE VIEW statements of revision 0002: exam_summary and attempts_per_day as
    0001 made them, and the four 0002 made as schema/views.py still has them (before one
    of those changes there, its 0002 text must be frozen here)."""
    from schema import views

    return [
        EXAM_SUMMARY, views.USER_RESULTS, _ATTEMPTS_PER_DAY.format(day=_DAY[dialect]), views.BATCH_RESULTS,
        views.SUBJECT_PERFORMANCE, STUDENT_SUBJECTS_0002,
    ]  # fmt: skip
