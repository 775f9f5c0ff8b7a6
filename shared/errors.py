"""Errors of the wire contract, each tied to the HTTP status the server answers with.

    BptvlmError
    ├── ProtocolError (ValueError)          400  body or header cannot be parsed
    │   ├── InvalidTensorError              422  a tensor has the wrong shape, dtype, byte count or values
    │   ├── PayloadTooLargeError            413  body, population, image count or response over a limit
    │   ├── RequestTimeoutError             408  the body did not arrive within the read deadline
    │   └── UnsupportedMediaTypeError       415  a Content-Encoding the server does not inflate
    ├── AuthError (PermissionError)         401  missing or unknown API key
    ├── ForbiddenError (PermissionError)    403  an output the key's output policy does not allow
    ├── NotFoundError (LookupError)         404  unknown model or image batch
    ├── RateLimitedError                    429  too many requests now (carries ``retry_after``)
    ├── BudgetExhaustedError                429  the key's query budget is spent (no Retry-After; carries
    │                                            ``remaining`` for X-Query-Budget-Remaining)
    ├── NotReadyError                       503  model not loaded or server overloaded (carries ``retry_after``)
    └── GatewayTimeoutError                 504  the request waited too long for the model

The server maps each class to its status in one exception handler; the client maps a status back
to the class, so both sides raise the same exceptions with the server's message.
"""

from __future__ import annotations


class BptvlmError(Exception):
    """Base class of every error that crosses the wire."""

    status_code: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(BptvlmError, ValueError):
    status_code = 400


class InvalidTensorError(ProtocolError):
    status_code = 422


class PayloadTooLargeError(ProtocolError):
    status_code = 413


class RequestTimeoutError(ProtocolError):
    status_code = 408


class UnsupportedMediaTypeError(ProtocolError):
    status_code = 415


class AuthError(BptvlmError, PermissionError):
    status_code = 401


class ForbiddenError(BptvlmError, PermissionError):
    status_code = 403


class NotFoundError(BptvlmError, LookupError):
    status_code = 404


class RateLimitedError(BptvlmError):
    status_code = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetExhaustedError(BptvlmError):
    status_code = 429

    def __init__(self, message: str, remaining: int | None = None) -> None:
        super().__init__(message)
        self.remaining = remaining


class NotReadyError(BptvlmError):
    status_code = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GatewayTimeoutError(BptvlmError):
    status_code = 504


def error_from_status(status: int, message: str, retry_after: float | None = None) -> BptvlmError:
    """The exception a client raises for an error response (status, ``{"error": message}``)."""
    if status == 429:
        # A budget error carries no Retry-After: waiting does not help.
        if retry_after is None:
            return BudgetExhaustedError(message)
        return RateLimitedError(message, retry_after)
    if status == 503:
        return NotReadyError(message, retry_after if retry_after is not None else 1.0)
    by_status: dict[int, type[BptvlmError]] = {
        400: ProtocolError,
        401: AuthError,
        403: ForbiddenError,
        408: RequestTimeoutError,
        415: UnsupportedMediaTypeError,
        404: NotFoundError,
        413: PayloadTooLargeError,
        422: InvalidTensorError,
        504: GatewayTimeoutError,
    }
    cls = by_status.get(status, BptvlmError)
    err = cls(message)
    err.status_code = status
    return err
