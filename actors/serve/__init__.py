"""The online half: a Ray Serve application of two deployments with an OpenAI-compatible API.

`actors.serve:build_app` is the application's import path (deploy/serve_config.yaml,
deploy/rayservice.yaml, `serve run`). The modules, each importing only those after it:

- `launch`: `jobs/serve.py` (flags, a local Ray, Ctrl-C);
- `ingress`: the FastAPI ingress deployment and `build_app`;
- `model`: the model deployment (a `Predictor` per replica) and its handle methods;
- `batching`: coalescing concurrent requests into mixed batches, counters, metrics;
- `api`: request bodies, their checks and OpenAI's answer shapes (no Ray);
- `options`: `ServeOptions` and how application args arrive (no Ray).

`build_app` is imported on first use, so that importing `actors.serve.options` (the
driver's argument checks, `jobs/serve.py --help`) does not load Ray, and a model replica,
which imports `actors.serve.model`, does not build the ingress's FastAPI app.
"""

from __future__ import annotations

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from actors.serve.ingress import build_app

        return build_app
    raise AttributeError(f"module 'actors.serve' has no attribute {name!r}")
