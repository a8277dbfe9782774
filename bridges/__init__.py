"""MQTT <-> JetStream bridge: validates device messages into the log, delivers commands back."""
