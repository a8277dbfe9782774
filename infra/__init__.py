"""The ground floor every service stands on: settings, HTTP kit, JetStream and stream names,
the event store, Redis view keys, logs, metrics, tracing, secrets handover, the broker's dynamic
security client and the replay framework. It imports `domain/` and libraries, never a service.
"""
