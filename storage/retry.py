"""Which storage errors are worth another try, and trying again with backoff.

Object stores fail in passing: a connection refused while a server restarts, ``503 SlowDown``
when throttled, a body cut short. s3fs and botocore already retry some of these internally;
what still escapes them arrives as one of several unrelated types (``OSError`` from s3fs's
translation, botocore's own ``ConnectionError``, aiohttp's ``ClientPayloadError``,
``http.client.IncompleteRead``), so :func:`is_transient` names them in one place. Errors that
waiting will not fix (a missing key, a refused permission, a bad argument) are not transient.
"""

from __future__ import annotations

import errno
import http.client
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["is_transient", "with_retries"]

T = TypeVar("T")
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
#: errnos s3fs gives to answers that will not change by waiting (bad bucket name, bad request).
_PERMANENT_ERRNOS = {errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM}


def _library_transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [http.client.IncompleteRead]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, ResponseStreamingError

        types += [BotoConnectionError, HTTPClientError, ResponseStreamingError]
    except ImportError:  # botocore comes with s3fs; without it there is no S3 to fail
        pass
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError

        types += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


_TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    *_library_transient_types(),
)


def is_transient(error: BaseException) -> bool:
    """True for a dropped or refused connection, a timeout, a short read or a throttling /
    server-error answer, looking through ``__cause__`` chains."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, _TRANSIENT):
            return True
        if isinstance(cause, OSError) and not isinstance(cause, _PERMANENT_OS_ERRORS):
            return cause.errno not in _PERMANENT_ERRNOS
        cause = cause.__cause__
    return False


def with_retries(call: Callable[[], T], attempts: int, backoff_seconds: float) -> T:
    """``call()``, again after 1x, 2x, 4x ... ``backoff_seconds`` while it fails transiently;
    the last error is raised after ``attempts`` tries, or at once when it is not transient."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:
            if attempt == attempts - 1 or not is_transient(error):
                raise
            time.sleep(backoff_seconds * 2**attempt)
    raise AssertionError("unreachable")
