"""Errors the service answers with a 4xx and a message, never a stack trace."""


class ServiceError(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status
