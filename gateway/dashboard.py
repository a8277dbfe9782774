"""The built-in dashboard: static files (HTML, CSS, JavaScript, no build step, nothing fetched
from elsewhere at view time) under `gateway/static/`, served at `/` and `/ui/`, and the one
thing the page cannot know by itself: where the command API is (`/ui/config.json`)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

STATIC = Path(__file__).resolve().parent / "static"

# The page's scripts and styles are its own files; it calls this gateway and the command API
# (another origin: `connect-src` admits any, the command API's CORS decides which origin it
# answers) and draws its charts as inline SVG.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' http: https:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag) so that an upgrade shows at once
}


class _Static(StaticFiles):
    """StaticFiles with the page's security and caching headers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, with_headers)


def routes(commands_url: str) -> list[BaseRoute]:
    """`/` (the page), `/ui/*` (its files), `/ui/config.json` and `/favicon.ico`. An empty
    `commands_url` leaves the page to find the command API on port 8080 of the host it was
    loaded from."""

    async def index(_: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=HEADERS)

    async def favicon(_: Request) -> Response:
        # what a browser asks for by itself on any page of this origin (JSON included)
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml", headers=HEADERS)

    async def config(_: Request) -> Response:
        return JSONResponse({"commands_url": commands_url or None}, headers=HEADERS)

    return [
        Route("/", index, methods=["GET"]),
        Route("/favicon.ico", favicon, methods=["GET"]),
        Route("/ui/config.json", config, methods=["GET"]),
        Mount("/ui", app=_Static(directory=STATIC), name="ui"),
    ]
