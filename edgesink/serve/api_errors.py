"""The error a request gets: an HTTP status and an OpenAI-shaped body."""

from __future__ import annotations

import re


class ApiError(Exception):
    """A request the server refuses: ``status`` and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


PATH_LIKE = re.compile(r"(?:[A-Za-z]:)?(?:/[^\s'\"/:]+){2,}/?")


def without_paths(message: str) -> str:
    """A message with the server's file paths taken out: a client need not learn them."""
    return PATH_LIKE.sub("<path>", message)
