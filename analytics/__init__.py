"""The Analytics service: alert rules evaluated on the stream."""
