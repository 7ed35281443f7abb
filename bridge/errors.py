"""The one exception tree of event-bridge, and the error classes of SCF.

Every failure an invocation can have carries one of four *error classes*
(DESIGN.md, "Error classes"); the retry policy asks the error for its class
instead of keeping lists of exception types::

    BridgeError
    ├── ConfigError (ValueError)         bad configuration; exit 78
    ├── PluginError (LookupError)        unknown plugin type or a plugin that fails to import
    ├── DependencyError                  a function's requirements could not be installed
    └── InvocationError                  an invocation failed; has ``error_class``
        ├── InvalidRequest               invalid_request: retrying cannot help
        │   ├── FunctionNotFound
        │   ├── EventTooLarge
        │   └── BadEvent                 the event is not JSON / not an object
        ├── Throttled                    throttled: "Resource limit exceed for function"
        ├── FunctionError                function_error: the user's code failed
        │   ├── HandlerNotFound          entry file or handler function missing
        │   ├── HandlerFailed            the handler raised
        │   ├── BadResult                return value not JSON-serializable
        │   ├── FunctionTimeout
        │   ├── OutOfMemory
        │   └── NonZeroExit
        ├── SystemFault                  system_error: bridge or transport fault
        │   └── WorkerCrashed
        ├── RetryRequested               the function asked to be retried after a delay
        └── Dropped                      the function dropped the event on purpose

The class docstring doubles as the default message.
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

EX_OK = 0
EX_FAILURE = 1
EX_CONFIG = 78  # sysexits.h EX_CONFIG; systemd unit uses RestartPreventExitStatus=78


class ErrorClass(enum.StrEnum):
    """What went wrong, as far as retrying is concerned."""

    INVALID_REQUEST = "invalid_request"
    THROTTLED = "throttled"
    FUNCTION_ERROR = "function_error"
    SYSTEM_ERROR = "system_error"


class BridgeError(Exception):
    """event-bridge failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


def cannot_listen(key: str, host: str, port: str | int, e: OSError) -> BridgeError:
    """What a listener (``api.listen``, ``gateway.listen``) that cannot bind says."""
    return BridgeError(
        f"{key}: cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}"
        + (" (another process uses this port)" if e.errno == errno.EADDRINUSE else "")
    )


class ConfigError(BridgeError, ValueError):
    """The configuration is invalid."""

    def __init__(self, problems: Iterable[tuple[str, str]], source: str | None = None) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        self.source = source
        lines = [f"{loc}: {msg}" if loc else msg for loc, msg in self.problems]
        head = f"invalid configuration{f' in {source}' if source else ''}"
        head += f" ({len(lines)} problem{'s' if len(lines) != 1 else ''}):"
        super().__init__("\n".join([head, *("  " + ln for ln in lines)]))


class PluginError(BridgeError, LookupError):
    """A plugin could not be found or loaded."""


class DependencyError(BridgeError):
    """A function's dependencies could not be installed."""


class InvocationError(BridgeError):
    """The invocation failed."""

    error_class: ClassVar[ErrorClass] = ErrorClass.SYSTEM_ERROR
    #: SCF-style numeric error code reported to callers and in dead letters.
    error_code: ClassVar[int] = -1

    def __init__(
        self,
        message: str | None = None,
        *,
        detail: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        #: traceback, stderr tail or response body: for logs and dead letters
        self.detail = detail
        #: a delay the function asked for (HTTP Retry-After); the policy may honour it
        self.retry_after_s = retry_after_s
        self.request_id: str | None = None
        self.function: str | None = None

    @property
    def retriable(self) -> bool:
        return self.error_class is not ErrorClass.INVALID_REQUEST

    @property
    def uses_retry_budget(self) -> bool:
        """Whether this failure counts against ``retry_attempts``: function errors do; a
        handler's own ``Retry(…)`` or drop is a signal, not a failure."""
        return self.error_class is ErrorClass.FUNCTION_ERROR

    def to_dict(self) -> dict[str, Any]:
        """The error as returned to a RequestResponse caller (SCF shape plus our class)."""
        out: dict[str, Any] = {
            "errorCode": self.error_code,
            "errorMessage": self.message,
            "errorType": type(self).__name__,
            "errorClass": self.error_class.value,
        }
        if self.request_id:
            out["requestId"] = self.request_id
        if self.detail:
            out["stackTrace"] = self.detail
        return out


class InvalidRequest(InvocationError):
    """The request is invalid."""

    error_class = ErrorClass.INVALID_REQUEST
    error_code = 400


class FunctionNotFound(InvalidRequest):
    """Function not found."""

    error_code = 404


class EventTooLarge(InvalidRequest):
    """The event is larger than the invocation type allows."""

    error_code = 413


class BadEvent(InvalidRequest):
    """The event is not a JSON object."""


class Throttled(InvocationError):
    """Resource limit exceed for function."""

    error_class = ErrorClass.THROTTLED
    error_code = 429


class FunctionError(InvocationError):
    """The function failed."""

    error_class = ErrorClass.FUNCTION_ERROR
    error_code = 1


class HandlerNotFound(FunctionError):
    """The entry file or the handler function was not found."""


class HandlerFailed(FunctionError):
    """The handler raised an exception."""


class BadResult(FunctionError):
    """The handler returned a value that is not JSON-serializable."""


class FunctionTimeout(FunctionError):
    """Invoking task timed out."""

    error_code = 433


class OutOfMemory(FunctionError):
    """Memory limit exceeded."""

    error_code = 434


class NonZeroExit(FunctionError):
    """The command exited with a non-zero status."""


class SystemFault(InvocationError):
    """The bridge or a transport failed."""

    error_class = ErrorClass.SYSTEM_ERROR
    error_code = 500


class WorkerCrashed(SystemFault):
    """The function's worker process died."""


class RetryRequested(InvocationError):
    """The function asked for a retry."""

    error_class = ErrorClass.FUNCTION_ERROR
    error_code = 1

    @property
    def uses_retry_budget(self) -> bool:
        return False  # a request, not a failure (arq's Retry)


class Dropped(InvocationError):
    """The function dropped the event on purpose."""

    error_class = ErrorClass.FUNCTION_ERROR
    error_code = 1

    @property
    def uses_retry_budget(self) -> bool:
        return False


_BY_CLASS: dict[ErrorClass, type[InvocationError]] = {
    ErrorClass.INVALID_REQUEST: InvalidRequest,
    ErrorClass.THROTTLED: Throttled,
    ErrorClass.FUNCTION_ERROR: FunctionError,
    ErrorClass.SYSTEM_ERROR: SystemFault,
}


def error_for_class(error_class: ErrorClass | str) -> type[InvocationError]:
    """The generic exception type for an error class name."""
    return _BY_CLASS[ErrorClass(error_class)]


def http_status_error(status: int) -> type[InvocationError] | None:
    """Map an HTTP status from a function to an error type; None for success (DESIGN.md)."""
    if status < 400:
        return None
    if status == 429:
        return Throttled
    if status in (400, 401, 403, 404, 413, 422):
        return InvalidRequest
    if status in (502, 503, 504):
        return SystemFault
    if status < 500:
        return InvalidRequest
    return FunctionError


def format_problems(problems: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"{loc}: {msg}" for loc, msg in problems)
