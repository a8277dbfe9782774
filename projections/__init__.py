"""Read side: projections of the log into InfluxDB and Redis (issue 3)."""
