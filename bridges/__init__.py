"""MQTT <-> JetStream bridge (issue 3)."""
