"""The reference job: dlt's rest_api source loading the same exams and attempts.

    python -m bench.dlt_job BASE_URL DATABASE_URL PIPELINES_DIR

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

USERNAME, PASSWORD = "admin", "secret"  # the simulator's login, as in bench/__main__.py


def login(base: str) -> str:
    request = urllib.request.Request(
        f"{base}/api/v2.1/auth-token/",
        data=json.dumps({"username": USERNAME, "password": PASSWORD}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["token"])


def main() -> None:
    import dlt
    from dlt.sources.rest_api import rest_api_source

    base, database_url, pipelines_dir = sys.argv[1:4]
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
