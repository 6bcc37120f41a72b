"""The Starlette application: JSON routes under ``/api``, the page and its assets from ``static/``.

Errors are JSON ``{"error": message, "problems": [...]}``: 400 a bad request, 403 a path outside the roots or a
missing token, 404 unknown, 409 an output folder in use, 422 a config the schema (or TOML) rejects.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config_parser import load_config
from ..errors import ConfigError, UserError
from . import configs, watch
from .runs import RunBusy, RunManager, live_lock
from .schema_view import schema_view
from .security import TOKEN_COOKIE, PathRefused, Roots

STATIC = Path(__file__).parent / "static"


def _error(exc: UserError) -> JSONResponse:
    status = 403 if isinstance(exc, PathRefused) else 409 if isinstance(exc, RunBusy) else \
        422 if isinstance(exc, ConfigError) else 400
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, ConfigError):
        body["problems"] = [{"key": configs.problem_key(p), "message": p} for p in exc.problems]
    return JSONResponse(body, status_code=status)


class TokenMiddleware(BaseHTTPMiddleware):
    """With a token: every request carries it (``?token=``, then the cookie set on that first answer)."""

    def __init__(self, app: Any, token: str | None):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        if self.token is None:
            return await call_next(request)
        given = request.query_params.get("token")
        if given != self.token and request.cookies.get(TOKEN_COOKIE) != self.token:
            return JSONResponse({"error": "this server needs its access token: open the URL that "
                                          "`wantrainer ui` printed (it ends in ?token=...)"}, status_code=403)
        response = await call_next(request)
        if given == self.token:
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return response


def _estimate_available(python: str) -> bool:
    try:
        return subprocess.run([python, "-m", "wantrainer.cli", "estimate", "--help"], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Api:
    """The route handlers, bound to the roots, the run manager and the event reader."""

    def __init__(self, roots: Roots, manager: RunManager):
        self.roots = roots
        self.manager = manager
        self.events = watch.EventReader()
        self._estimate: bool | None = None

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise UserError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise UserError("the request body must be a JSON object")
        return body

    def _param(self, request: Request, name: str) -> str:
        value = request.query_params.get(name)
        if not value:
            raise UserError(f"missing query parameter `{name}`")
        return value

    async def info(self, request: Request) -> JSONResponse:
        if self._estimate is None:
            self._estimate = _estimate_available(self.manager.python)
        return JSONResponse({"roots": [str(r) for r in self.roots.folders], "estimate": self._estimate})

    async def schema(self, request: Request) -> JSONResponse:
        return JSONResponse(schema_view())

    async def list_configs(self, request: Request) -> JSONResponse:
        return JSONResponse({"configs": configs.list_configs(self.roots)})

    async def read_config(self, request: Request) -> JSONResponse:
        return JSONResponse(configs.read_config(self.roots, self._param(request, "path")))

    async def validate(self, request: Request) -> JSONResponse:
        body = await self._json(request)
        file = self.roots.resolve(body.get("path"))
        data = configs.parse_text(body["text"]) if isinstance(body.get("text"), str) else body.get("data")
        if not isinstance(data, dict):
            raise UserError("send `text` (the TOML) or `data` (a table)")
        result = {**configs.check(data, file), "data": data}
        if not isinstance(body.get("text"), str):  # the TOML the form would save, comments of the file kept
            old = file.read_text(encoding="utf-8") if file.is_file() else None
            result["text"] = configs.render(old, data)
        return JSONResponse(result)

    async def save(self, request: Request) -> JSONResponse:
        body = await self._json(request)
        data = body.get("data")
        if data is not None and not isinstance(data, dict):
            raise UserError("`data` must be a table")
        return JSONResponse(configs.save_config(self.roots, body.get("path"), text=body.get("text"), data=data,
                                                create=bool(body.get("create"))))

    async def start_run(self, request: Request) -> JSONResponse:
        body = await self._json(request)
        config = self.roots.resolve(body.get("config"))
        run = self.manager.start(str(body.get("command", "")), config)
        return JSONResponse(run.view(), status_code=201)

    async def list_runs(self, request: Request) -> JSONResponse:
        return JSONResponse({"runs": [{k: v for k, v in r.view().items() if k != "lines"}
                                      for r in self.manager.list()]})

    def _run_id(self, request: Request) -> int:
        return int(request.path_params["run_id"])

    async def get_run(self, request: Request) -> JSONResponse:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            raise UserError("`since` must be an integer") from None
        return JSONResponse(self.manager.get(self._run_id(request)).view(since))

    async def stop_run(self, request: Request) -> JSONResponse:
        return JSONResponse(self.manager.stop(self._run_id(request)).view())

    async def watch(self, request: Request) -> JSONResponse:
        """Curves, samples, saves and doctor plots of the config's output folder."""
        cfg = load_config(self.roots.resolve(self._param(request, "config")))
        out = Path(cfg.saving.output_dir)
        logs = Path(cfg.logging.logging_dir or out / "logs")
        return JSONResponse({
            "output_dir": str(out), "output_name": cfg.saving.output_name, "logging_dir": str(logs),
            "scalars": self.events.scalars(logs, cfg.saving.output_name),
            "samples": watch.media(out / "sample"),
            "saves": watch.saves(out, cfg.saving.output_name),
            "doctor": watch.media(out, "doctor_*.png"),
            "lock": live_lock(out, cfg.saving.output_name),
        })

    async def file(self, request: Request) -> Response:
        path = self.roots.resolve(self._param(request, "path"))
        if not path.is_file():
            return JSONResponse({"error": f"{path}: no such file"}, status_code=404)
        return FileResponse(path)


def _wrap(handler: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except UserError as exc:
            return _error(exc)
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)
    return endpoint


async def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


def create_app(roots: list[Path], token: str | None = None, python: str | None = None) -> Starlette:
    """The UI for the folders ``roots``; ``token``: required on every request when set (non-loopback hosts)."""
    api = Api(Roots(roots), RunManager(python or sys.executable))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        api.manager.stop_all()  # a server that stops asks its runs to save and stop first

    routes = [
        Route("/", _index),
        Route("/api/info", _wrap(api.info)),
        Route("/api/schema", _wrap(api.schema)),
        Route("/api/configs", _wrap(api.list_configs)),
        Route("/api/config", _wrap(api.read_config)),
        Route("/api/validate", _wrap(api.validate), methods=["POST"]),
        Route("/api/save", _wrap(api.save), methods=["POST"]),
        Route("/api/runs", _wrap(api.list_runs)),
        Route("/api/runs", _wrap(api.start_run), methods=["POST"]),
        Route("/api/runs/{run_id:int}", _wrap(api.get_run)),
        Route("/api/runs/{run_id:int}/stop", _wrap(api.stop_run), methods=["POST"]),
        Route("/api/watch", _wrap(api.watch)),
        Route("/api/file", _wrap(api.file)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(TokenMiddleware, token=token)], lifespan=lifespan)
    app.state.api = api
    return app

