"""The `iot` command and whole-system operations: the supervisor (`iot up`), backup and restore,
replay orchestration, the device simulator and the broker's configuration files. It sits on top:
it may import every service; no service imports it.
"""
