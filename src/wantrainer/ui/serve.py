"""``wantrainer ui``: serve the page on 127.0.0.1 (or ``--host``) and print its URL."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..common.logger import get_logger
from ..errors import UserError
from .security import is_loopback, new_token

logger = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", action="append", default=None, metavar="DIR",
                   help="a folder the UI may read and write (configs, datasets, outputs); repeat for more. "
                        "Default: the current folder. Nothing outside these folders is served or written")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only). Any other address "
                        "requires the access token printed in the URL")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")


def url_for(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host and not host.startswith("[") \
        else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise UserError(f"the web UI needs its extra packages ({exc.name} is missing): "
                        "pip install 'wantrainer[ui]'") from None
    roots = [Path(r) for r in (args.root or ["."])]
    token = None if is_loopback(args.host) else new_token()
    app = create_app(roots, token=token)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets=None) -> None:  # print the URL once the port is known (--port 0)
        await original(sockets=sockets)
        port = args.port
        for srv in getattr(server, "servers", []):
            for sock in getattr(srv, "sockets", []):
                port = sock.getsockname()[1]
        print(f"wantrainer ui: {url_for(args.host, port, token)}", flush=True)
        print("  folders: " + ", ".join(str(r.resolve()) for r in roots), flush=True)
        if token:
            print(f"  listening on {args.host}: the token in the URL is required; keep it private", flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    return 0
