"""The HTTP APIs fuzzed from their own OpenAPI documents by schemathesis (a tool nobody here
wrote), against the real processes on the real services: no 5xx, answers conform to the
documented schemas and status codes. Deterministic generation and a fixed budget keep the run
reproducible (`IOT_FUZZ_EXAMPLES` raises the budget). On the gateway of a fresh system every
consistency token the fuzzer makes up is beyond the log's head: a 400 after the short grace,
never the 503 of a token the views have yet to reach."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.settings import Settings
from tests.conftest import TOKENS
from tests.e2e.processes import Component

pytestmark = pytest.mark.e2e

EXAMPLES = os.environ.get("IOT_FUZZ_EXAMPLES", "25")
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance"
ADMIN = next(t for t, r in TOKENS.items() if r == "admin")
WORKERS = "4"  # operations fuzzed side by side; each one's examples stay deterministic


def schemathesis(url: str, report: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert binary, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    return subprocess.run(
        [
            binary,
            "--no-color",
            "run",
            f"{url}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            EXAMPLES,
            "--generation-deterministic",
            "--workers",
            WORKERS,
            "--header",
            f"Authorization: Bearer {ADMIN}",
            "--request-timeout",
            "10",
            "--continue-on-failure",
            "--report",
            "junit",
            "--report-dir",
            str(report),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("api", ["commands", "gateway"])
def test_the_api_is_fuzz_clean(migrated: Settings, api: str, tmp_path: Path) -> None:
    # The admin token may reach every operation (the gateway's /deadletters too); the rate
    # limit is raised so the fuzzer's requests are answered rather than 429ed.
    component = Component(migrated, api, IOT_RATE_LIMIT_PER_MINUTE="1000000")
    try:
        component.wait_ready(30)
        done = schemathesis(component.url, tmp_path)
        assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    finally:
        component.stop()
