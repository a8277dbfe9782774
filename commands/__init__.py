"""Write side: the operator command API, command handlers, the event store and the relay."""
