"""The server's one error shape, `{"error": {"message": ..., "field": ...}}`: every 4xx and 5xx the server
answers carries it, so a client reads the same two keys whatever went wrong (decision: OpenAI's
`error.message`, with `field` naming the request field at fault, null when none is)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse


class RequestError(Exception):
    """A request the server will not run: `status` (4xx), what was wrong and expected, the field at fault."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.field, self.status = message, field, status
        self.headers = dict(headers or {})


def error_body(message: str, field: str | None = None) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "field": field}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(
        error_body(error.message, error.field), status_code=error.status, headers=error.headers
    )
