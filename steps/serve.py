"""serve: one MLflow model behind OpenAI's chat API (/v1/chat/completions, /v1/models), /health and /invocations."""

from __future__ import annotations

import click

from phi3flow import settings
from phi3flow.errors import run_step
from phi3flow.server import serve


@click.command()
@click.option("--model-uri", default=settings.SERVE_DEFAULT_MODEL_URI, show_default=True,
              help="The MLflow model to serve: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/..., a path.")
@click.option("--host", default=settings.SERVE_DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=settings.SERVE_DEFAULT_PORT, show_default=True,
              help="Port to listen on.")
def main(model_uri: str, host: str, port: int) -> None:
    serve(model_uri, host, port)


if __name__ == "__main__":
    run_step(main)
