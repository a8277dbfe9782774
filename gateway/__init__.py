"""Read-only gateway for dashboards: device views, time series, history, fleet counts, SSE."""
