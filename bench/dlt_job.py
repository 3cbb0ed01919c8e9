"""The reference job: dlt's rest_api source loading the same exams and attempts.

    python -m bench.dlt_job BASE_URL DATABASE_URL PIPELINES_DIR [admin]

With `admin`, the institute-wide endpoints of the admin API (v2.5) instead: exams,
attempts, users with each user's batches, and batches, as the W2 scenario's sync reads
them (bench/admin.py).

Configured the way its documentation shows for a paginated API with child resources:
the JWT from one login as an Authorization header, the envelope's `next` link followed,
`results` selected, every exam's attempts as a dependent resource fetched in parallel,
merged on `id`. It prints one JSON line with the row counts it loaded. It stores the
payloads as dlt flattens them; it does not parse durations, decimals or "NA" ranks.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any

USERNAME, PASSWORD = "admin", "secret"  # the simulator's login, as in bench/__main__.py


def login(base: str) -> str:
    request = urllib.request.Request(
        f"{base}/api/v2.1/auth-token/",
        data=json.dumps({"username": USERNAME, "password": PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["token"])


def admin_config(base: str, token: str) -> dict[str, Any]:
    """The admin listings, paginated by page number. Their envelope tells the items
    (`count`) and the page size (`per_page`), not the pages that dlt's `total_path` wants,
    so a small PageNumberPaginator works the last page out; the pages of one listing are
    then read one after another, as dlt reads every paginated listing."""
    from dlt.sources.helpers.rest_client.paginators import PageNumberPaginator

    class CountPerPagePaginator(PageNumberPaginator):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(base_page=1, page_param="page", total_path=None, stop_after_empty_page=True)

        def update_state(self, response: Any, data: Any = None) -> None:
            envelope = response.json()
            last = -(-int(envelope["count"]) // max(1, int(envelope["per_page"])))
            super().update_state(response, data)  # the next page number; stops on an empty page
            if self.current_value > last:
                self._has_next_page = False

    return {
        "client": {
            "base_url": f"{base}/api/v2.5/admin/",
            "auth": {"type": "api_key", "name": "Authorization", "api_key": f"JWT {token}", "location": "header"},
            "paginator": CountPerPagePaginator(),
        },
        "resource_defaults": {
            "primary_key": "id",
            "write_disposition": "merge",
            "endpoint": {"data_selector": "results"},
        },
        "resources": [
            {"name": "exams", "endpoint": {"path": "exams/"}},
            {"name": "attempts", "endpoint": {"path": "attempts/"}},
            {"name": "users", "endpoint": {"path": "users/"}},
            {"name": "batches", "endpoint": {"path": "batches/"}},
            # Each user's batches, fetched in parallel; the membership's key is the pair.
            {"name": "user_batches", "parallelized": True, "primary_key": ["_users_id", "id"],
             "include_from_parent": ["id"], "endpoint": {"path": "users/{resources.users.id}/batches/"}},
        ],
    }  # fmt: skip


def main() -> None:
    import dlt
    from dlt.sources.rest_api import rest_api_source

    base, database_url, pipelines_dir = sys.argv[1:4]
    if sys.argv[4:] == ["admin"]:
        admin = admin_config(base, login(base))
        pipeline = dlt.pipeline(
            pipeline_name="testpress_admin_bench",
            destination=dlt.destinations.sqlalchemy(database_url),
            dataset_name="testpress",
            pipelines_dir=pipelines_dir,
        )
        pipeline.run(rest_api_source(admin))  # type: ignore[arg-type]
        counts = pipeline.last_trace.last_normalize_info.row_counts
        print(json.dumps({name: counts.get(name, 0) for name in ("exams", "attempts", "users", "batches", "user_batches")}))
        return
    source = rest_api_source({
        "client": {
            "base_url": f"{base}/api/v2.1/",
            "auth": {"type": "api_key", "name": "Authorization", "api_key": f"JWT {login(base)}", "location": "header"},
            "paginator": {"type": "json_link", "next_url_path": "next"},
        },
        "resource_defaults": {
            "primary_key": "id",
            "write_disposition": "merge",
            "endpoint": {"data_selector": "results"},
        },
        "resources": [
            {"name": "exams", "endpoint": {"path": "exams/"}},
            {"name": "attempts", "parallelized": True, "endpoint": {"path": "exams/{resources.exams.slug}/attempts/"}},
        ],
    })  # fmt: skip
    pipeline = dlt.pipeline(
        pipeline_name="testpress_bench",
        destination=dlt.destinations.sqlalchemy(database_url),
        dataset_name="testpress",
        pipelines_dir=pipelines_dir,
    )
    pipeline.run(source)
    counts = pipeline.last_trace.last_normalize_info.row_counts
    print(json.dumps({"exams": counts.get("exams", 0), "attempts": counts.get("attempts", 0)}))


if __name__ == "__main__":
    main()
