"""`qstar serve`: an OpenAI-compatible server that thinks before every token (qstar/core/serving)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from qstar.cli.errors import user_errors
from qstar.cli.options import ModelChoice, model_options


@user_errors
@model_options
def serve(
    model: ModelChoice,
    host: Annotated[
        str, typer.Option(help="Address to bind; another than 127.0.0.1 opens the server to the network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model's name in the API [default: the checkpoint's directory name]")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Rows (requests x n) decoded together at most")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more get HTTP 429 with Retry-After")] = 64,
    reasoning: Annotated[
        bool, typer.Option(help="Return each token's thought as reasoning_content unless a request says otherwise")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="QSTAR_API_KEY", help="Require Authorization: Bearer KEY on every route but /health"),
    ] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API.

    /v1/chat/completions, /v1/completions, /v1/models and /health."""
    from pathlib import Path

    from qstar.core.extras import require_extra

    require_extra("fastapi", "serve", "qstar serve")
    uvicorn = require_extra("uvicorn", "serve", "qstar serve")
    from qstar.core.serving.batcher import Batcher
    from qstar.core.serving.openai_api import Server, build_app

    if api_key is None and not loopback(host):
        typer.echo(
            f"warning: --host {host} opens the server to the network without --api-key: anyone can use it", err=True
        )
    m = model.load()
    name = served_model_name or Path(str(model.path)).name
    batcher = Batcher(m, max_batch=max_batch, max_queue=max_queue)
    batcher.start()
    typer.echo(f"serving {name} ({model.path}) at http://{host}:{port}/v1", err=True)
    try:
        uvicorn.run(build_app(Server(m, name, batcher, reasoning, api_key)), host=host, port=port, log_level="warning")
    finally:
        batcher.close()


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost
        return False
