"""Shared plumbing: settings, HTTP kit, logging, stream names and the `iot` command line."""
