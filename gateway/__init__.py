"""Read-only gateway for dashboards (issue 3)."""
