"""Domain errors: each carries a reason a caller can show."""


class DomainError(Exception):
    """A command the aggregate refuses."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IllegalTransition(DomainError):
    """The lifecycle does not allow this command in the device's current status."""


class InvalidCommand(DomainError):
    """The command's arguments break a domain rule."""
