"""`cpm-lightning serve`: a model behind the OpenAI-compatible HTTP API of
cpm_lightning/inference/server.py, run by uvicorn (docs/inference.md, "Serving")."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from pathlib import Path

from cpm_lightning.cli.loader import add_adapter_arguments
from cpm_lightning.core import precision
from cpm_lightning.core.errors import UserError

API_KEY_ENV = "CPM_LIGHTNING_API_KEY"


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP API of a model (/v1/completions, "
                           "/v1/chat/completions, /v1/models) for the openai client, chat front-ends and LangChain")
    serve.add_argument("source", help="what generate takes: a checkpoint written by fit, a model directory, a pulled "
                       "release or a models:/ URI")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer "
                       "only; 0.0.0.0 for every network it is on)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free one)")
    serve.add_argument("--model-name", help="the model's id in /v1/models and in requests (default: from SOURCE, "
                       "e.g. demo/3 for models:/demo/3, model for ./model)")
    serve.add_argument("--api-key", help=f"require `Authorization: Bearer KEY` on every request (default: "
                       f"${API_KEY_ENV}, else no key)")
    serve.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    precision.add_arguments(serve)
    add_adapter_arguments(serve)
    serve.set_defaults(func=serve_model)


def serve_model(args) -> None:
    import uvicorn

    from cpm_lightning.cli.loader import load_model
    from cpm_lightning.inference.server import create_app

    if args.api_key == "":
        raise UserError("--api-key is empty; give a key, or leave the option out to serve without one")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    wanted = precision.of(args)
    sock = listen(args.host, args.port)  # before the model loads: a port in use fails in a second, not minutes
    try:
        model, tokenizer = load_model(args.source, args.device, wanted, args.adapter, args.merge)
        name = args.model_name or model_name(args.source)
        host, port = sock.getsockname()[:2]
        print(f"serving {name!r} at http://{f'[{host}]' if ':' in host else host}:{port}/v1"
              + (" (API key required)" if api_key else ""), flush=True)
        if api_key is None and host not in ("127.0.0.1", "::1"):
            print(f"warning: listening on {host} without an API key: anyone who can reach it can use the model "
                  f"(--api-key or ${API_KEY_ENV})", file=sys.stderr)
        app = create_app(model, tokenizer, name, api_key)
        # Ctrl-C is how a server stops: uvicorn shuts down gracefully, then re-raises the signal.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port) for uvicorn to serve on, or a UserError saying why not."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0 to 65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: not an address of this computer ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn binds: a port a previous server left in TIME_WAIT is free to take again.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        hint = "; stop what uses it or pick another --port" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    sock.listen()  # from now on a client that connects waits, while the model loads, instead of being refused
    return sock


def model_name(source: str) -> str:
    """The model's id when --model-name is not given: a models:/ URI without its scheme, else the
    file or directory name."""
    if source.startswith("models:/"):
        return source.removeprefix("models:/")
    return Path(source).resolve().stem or "model"
