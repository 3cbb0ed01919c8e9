"""Dashboard views, as SQL that runs on both dialects.

Kept beside the tables so that migrations, tests and the README draw on one text.
Deleted exams and attempts (deleted_at set) are left out of every view.
"""

from __future__ import annotations

# Expressions whose spelling differs between the dialects.
_DAY = {
    "sqlite": "date(a.date)",
    "postgresql": "CAST(a.date AT TIME ZONE 'UTC' AS DATE)",
}

# One student, as the views count them: by Testpress user id where the row has one (an
# admin row names its student by user_id only), else by username (revision 0003). Tagged,
# so that a username "42" is not user 42.
_STUDENT = "CASE WHEN a.user_id IS NOT NULL THEN 'id:' || CAST(a.user_id AS TEXT) ELSE 'name:' || a.username END"

# The views revision 0003 recreated.
COUNTING_STUDENTS = ("exam_summary", "attempts_per_day")

EXAM_SUMMARY = """
CREATE VIEW exam_summary AS
SELECT
    e.id AS exam_id,
    e.slug,
    e.title,
    e.course,
    COUNT(a.id) AS attempt_count,
    COUNT(DISTINCT {student}) AS distinct_users,
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

# Keyed by Testpress user id where known (admin rows always carry one; a student login's
# attempts may name a user by username only, and then the username is the key).
USER_RESULTS = """
CREATE VIEW user_results AS
SELECT
    COALESCE(MAX(u.username), MAX(a.username)) AS username,
    a.user_id,
    MAX(u.display_name) AS display_name,
    MAX(u.email) AS email,
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
LEFT JOIN users u ON u.user_id = a.user_id
WHERE a.deleted_at IS NULL
GROUP BY a.user_id, CASE WHEN a.user_id IS NULL THEN a.username END, e.id, e.slug, e.title, e.course
"""

BATCH_RESULTS = """
CREATE VIEW batch_results AS
SELECT
    b.id AS batch_id,
    b.name AS batch_name,
    e.id AS exam_id,
    e.title AS exam_title,
    COUNT(a.id) AS attempt_count,
    COUNT(DISTINCT a.user_id) AS distinct_students,
    ROUND(AVG(CASE WHEN a.state = 'Completed' THEN a.score END), 4) AS average_score,
    MAX(CASE WHEN a.state = 'Completed' THEN a.score END) AS best_score,
    CASE WHEN SUM(CASE WHEN a.result IN ('Pass', 'Fail') THEN 1 ELSE 0 END) = 0 THEN NULL
         ELSE ROUND(1.0 * SUM(CASE WHEN a.result = 'Pass' THEN 1 ELSE 0 END)
                    / SUM(CASE WHEN a.result IN ('Pass', 'Fail') THEN 1 ELSE 0 END), 4)
    END AS pass_rate
FROM batches b
JOIN user_batches ub ON ub.batch_id = b.id AND ub.deleted_at IS NULL
JOIN attempts a ON a.user_id = ub.user_id AND a.deleted_at IS NULL
JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL
WHERE b.deleted_at IS NULL
GROUP BY b.id, b.name, e.id, e.title
"""

SUBJECT_PERFORMANCE = """
CREATE VIEW subject_performance AS
SELECT
    a.exam_id,
    e.title AS exam_title,
    s.subject_id,
    s.subject_name,
    COUNT(DISTINCT s.attempt_id) AS attempt_count,
    ROUND(AVG(CASE WHEN s.total_count > 0 THEN 1.0 * s.correct_count / s.total_count END), 4)
        AS average_correct_ratio,
    ROUND(AVG(s.score), 4) AS average_score
FROM attempt_subjects s
JOIN attempts a ON a.id = s.attempt_id AND a.deleted_at IS NULL
JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL
GROUP BY a.exam_id, e.title, s.subject_id, s.subject_name
"""

# Each student's strength by subject, across every exam: where is this student weak?
STUDENT_SUBJECTS = """
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
JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL
LEFT JOIN users u ON u.user_id = a.user_id
GROUP BY a.user_id, CASE WHEN a.user_id IS NULL THEN a.username END, s.subject_id, s.subject_name
"""

_ATTEMPTS_PER_DAY = """
CREATE VIEW attempts_per_day AS
SELECT
    {day} AS day,
    a.exam_id,
    COUNT(a.id) AS attempt_count,
    COUNT(DISTINCT {student}) AS distinct_users,
    SUM(CASE WHEN a.state = 'Completed' THEN 1 ELSE 0 END) AS completed_count
FROM attempts a
JOIN exams e ON e.id = a.exam_id AND e.deleted_at IS NULL
WHERE a.deleted_at IS NULL AND a.date IS NOT NULL
GROUP BY {day}, a.exam_id
"""

VIEW_NAMES = (
    "exam_summary", "user_results", "attempts_per_day", "batch_results", "subject_performance",
    "student_subjects",
)  # fmt: skip


def view_name(statement: str) -> str:
    """The view a CREATE VIEW statement creates."""
    return statement.split("CREATE VIEW ", 1)[1].split()[0]


def create_view_statements(dialect: str) -> list[str]:
    """The CREATE VIEW statements of the current schema for one dialect."""
    return [
        EXAM_SUMMARY.format(student=_STUDENT), USER_RESULTS,
        _ATTEMPTS_PER_DAY.format(day=_DAY[dialect], student=_STUDENT), BATCH_RESULTS, SUBJECT_PERFORMANCE,
        STUDENT_SUBJECTS,
    ]  # fmt: skip
