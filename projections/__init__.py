"""Read side: projections of the log into InfluxDB (time series), Redis (views) and the broker's
dynamic security plugin (auth), each rebuildable from the log by its `*_replay` module."""
