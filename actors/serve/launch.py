"""`jobs/serve.py`: a local server from flags. Deploys the application of
`actors/serve/ingress.py` on a local Ray (or RAY_ADDRESS's cluster), prints the URL once it
answers, blocks until Ctrl-C or SIGTERM, then takes it down.

Imports go one way: this module -> `ingress` -> `options`, never back. Ray and the ingress are
imported inside `main` only, so `--help` and a bad flag answer without loading Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from actors.config import DTYPES, TASKS, PredictorConfig
from actors.options import add_flags
from actors.serve.options import BATCHERS, ServeOptions

logger = logging.getLogger(__name__)
APP_NAME = "switchyard"  # the application's name on the cluster (deploy/serve_config.yaml names it too)


def build_parser() -> argparse.ArgumentParser:
    """jobs/serve.py's flags: the Predictor's options and the serving options."""
    p = argparse.ArgumentParser(prog="serve.py", description="Switchyard online: an OpenAI-compatible server "
                                "for one base model and every adapter of a store, on Ray Serve.")
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--adapters", help="adapter store: a folder of PEFT adapter folders")
    p.add_argument("--task", required=True, choices=TASKS, help="what the model does with each request")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    choices = {"dtype": DTYPES, "batcher": BATCHERS}
    add_flags(p, PredictorConfig, skip={"model", "adapters", "task"}, choices=choices)
    add_flags(p, ServeOptions, choices=choices)
    return p


def main(argv: list[str] | None = None) -> int:
    """Deploy on a local Ray (or RAY_ADDRESS's), print the URL once it answers, block until
    Ctrl-C or SIGTERM, then take the application down. Returns the exit status."""
    from ray import serve

    from actors.serve.ingress import build_app

    args = vars(build_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        application = build_app({k: v for k, v in args.items() if v is not None})
        if args.get("adapters") or args.get("lora_modules"):  # every adapter as the replicas will read it
            from actors.store import parse_lora_modules
            from actors.validation import validate_store

            validate_store(args["model"], args.get("adapters"), args["task"],
                           modules=parse_lora_modules(args.get("lora_modules")))
        joined = _connect_ray(host, port)
    except ValueError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    logging.getLogger("ray.serve").addFilter(_DropServeNotice())
    status = 0
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")  # raises if a replica cannot start
        _wait_until_answering(port)
        print(f"Switchyard ({args['task']}) is serving at http://{host}:{port}/v1  (Ctrl-C stops it)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    except RuntimeError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        status = 1
    finally:
        _take_down(joined)
    return status


class _DropServeNotice(logging.Filter):
    """Drops Serve's "New http_options/controller_options will not be applied" line: `serve.run`
    logs it after `serve.start` set the options it means, so it misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()


def _connect_ray(host: str, port: int) -> bool:
    """Join RAY_ADDRESS's cluster (True) or start a local one (False, after checking the port).

    Raises:
        ValueError: the port is taken.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e}); pass another --port") from e
    ray.init(address="local", include_dashboard=False)
    return False


def _wait_until_answering(port: int, timeout_s: float = 120.0) -> None:
    """Poll GET /v1/models on loopback until it answers 200.

    Raises:
        RuntimeError: no answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the endpoint on port {port} did not answer within {timeout_s:.0f}s; see the Ray logs")
        time.sleep(0.25)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the server like Ctrl-C."""
    raise KeyboardInterrupt


def _take_down(joined: bool) -> None:
    """Delete our application on a joined cluster; shut Serve and Ray down on our own."""
    import ray
    from ray import serve

    try:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - e.g. Ray's own processes already got the signal too
        logger.warning("could not take the application down cleanly: %s", e)
    if not joined:
        ray.shutdown()
