"""What the data layer raises when it refuses a request: a refusal named in its own terms, with no HTTP status.

The API's boundary gives each kind its status and the `{"error": …}` body (errors.py, `STATUS`); a caller outside
HTTP (the offline provisioning of admin_cli) reads `error` and `detail` the same way. Keyword arguments become
fields of the answer's body beside `error` and `detail` (a conflict's current `version`, for instance).

    Refused
    ├── Malformed      the request cannot be read as asked (400)
    ├── Unauthenticated  a credential that does not prove who the caller is (401)
    ├── Forbidden      the caller may not do this (403)
    ├── NotFound       it does not exist, or the caller may not know it does (404)
    ├── Conflict       it contradicts what is stored (409)
    ├── TooLarge       over a size limit (413)
    ├── Invalid        a value the contract does not allow (422)
    ├── Throttled      too many, too fast: retry after `retry_after_s` (429)
    └── Busy           the server cannot take it now: retry after `retry_after_s` (503)
"""
from __future__ import annotations

from typing import Any


class Refused(Exception):
    def __init__(self, error: str, detail: Any = None, retry_after_s: int | None = None, **extra: Any):
        super().__init__(error)
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.extra = extra


class Malformed(Refused):
    pass


class Unauthenticated(Refused):
    pass


class Forbidden(Refused):
    pass


class NotFound(Refused):
    pass


class Conflict(Refused):
    pass


class TooLarge(Refused):
    pass


class Invalid(Refused):
    pass


class Throttled(Refused):
    pass


class Busy(Refused):
    pass
