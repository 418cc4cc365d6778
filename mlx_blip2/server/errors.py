"""What a failed request becomes: :class:`APIError` (``{"error": {"message", "type", "param", "code"}}``), and the
mapping from what the model worker raised to an HTTP status."""

from __future__ import annotations

from ..generation.decoding import GenerationCancelled
from ..images import ImageLoadError, ImageTooLargeError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "request_too_large", 415: "invalid_request_error",
               503: "server_busy", 504: "timeout"}


class APIError(Exception):
    """A request that cannot be served, with its status and the request field at fault (``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.code = code  # OpenAI's error code where it has one (e.g. "model_not_found"), else the status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code or self.status}}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# The serve flag that raises each limit an image can exceed (Pillow's own has none: it is past every setting).
LIMIT_FLAGS = {"pixels": "--max-pixels", "bytes": "--max-upload-mb"}


def image_error(e: ImageLoadError, param: str) -> APIError:
    """413 for an image over a limit (naming the server's setting), 400 for one that cannot be decoded."""
    if not isinstance(e, ImageTooLargeError):
        return APIError(400, str(e), param)
    flag = LIMIT_FLAGS.get(e.limit)
    return APIError(413, str(e) + (f" (this server's {flag})" if flag else ""), param)


def from_worker(e: BaseException) -> APIError:
    """The APIError a request gets for what the model worker raised on it."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ImageLoadError):
        return image_error(e, "image")
    if isinstance(e, (ValueError, TypeError)):
        return APIError(400, str(e), getattr(e, "param", None))
    if isinstance(e, GenerationCancelled):
        return APIError(504, "the request was cancelled")
    return APIError(500, "the model failed on this request; see the server log")
