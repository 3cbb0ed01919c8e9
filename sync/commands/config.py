"""`config`: the effective settings, each with the layer that set it, secrets redacted."""

from __future__ import annotations

import json
from collections.abc import Mapping

from sync.commands import Outcome
from sync.config import Settings, format_settings_report, settings_report


async def show_config(settings: Settings, sources: Mapping[str, str], *, as_json: bool) -> Outcome:
    rows = settings_report(settings, sources)
    print(json.dumps(rows, indent=2, default=str) if as_json else format_settings_report(rows))
    return Outcome.OK
