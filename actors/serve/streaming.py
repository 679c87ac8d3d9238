"""A Serve request's rows in the continuous batcher (`actors/engine.py`), seen from the
replica's event loop: `EngineRequest` submits them and hands back the engine's reports, and
`sse_events` turns a streaming request's reports into OpenAI's server-sent chunks. No FastAPI
here, and no Ray.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from actors.engine import DecodeEngine, RowRequest
from actors.serve.api import ApiError, Work, error_body, row_error, server_sent, stream_chunk, usage_chunk

ROW_NAMES = {"completions": "prompt", "chat/completions": "messages"}


class EngineRequest:
    """The rows of one request (input i's copy k is row i * copies + k), encoded up front so
    that a bad input is a 400 before any token, then submitted to the engine.

    Args:
        engine: the replica's DecodeEngine.
        work: the request's rows.
        endpoint: "completions" or "chat/completions".
    """

    def __init__(self, engine: DecodeEngine, work: Work, endpoint: str) -> None:
        self.engine, self.work, self.endpoint = engine, work, endpoint
        self.requests: list[RowRequest] = []
        self._queue: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        """Encode every row (in a worker thread: chat templates and tokenizers), then submit.

        Raises:
            ApiError: the first row that cannot run (as a non-streamed request would get it).
        """
        loop = asyncio.get_running_loop()
        encoded = await asyncio.to_thread(self._encode_all)
        work, options = self.work, self.work.options
        seed = options.get("seed")
        for i, (value, row) in enumerate(encoded):
            for k in range(work.copies):
                index = i * work.copies + k
                self.requests.append(RowRequest(
                    value, work.adapter, self._sink(loop, index), _params(work, i), options.get("top_p"),
                    None if seed is None else seed + k, options.get("stop"), work.logprobs, work.stream, row))
        for request in self.requests:
            self.engine.submit(request)

    def _encode_all(self) -> list[tuple[Any, Any]]:
        """(input, Encoded) per input; raises the request's error for the first bad one."""
        out, failed = [], []
        for i, value in enumerate(self.work.inputs):
            try:
                out.append((value, self.engine.predictor.encode_row(value, self.work.adapter, _params(self.work, i))))
            except Exception as e:  # noqa: BLE001 - RowError, or a tokenizer failure: the row's error
                failed.append({"error": str(e) if hasattr(e, "kind") else f"internal: {type(e).__name__}: {e}"})
                break
            failed.append({"error": None})
        error = row_error(failed, ROW_NAMES[self.endpoint])
        if error is not None:
            raise error
        return out

    def _sink(self, loop: asyncio.AbstractEventLoop, index: int):
        """The engine-thread callback of row `index`: its reports go to this loop's queue."""
        return lambda report: loop.call_soon_threadsafe(self._queue.put_nowait, (index, report))

    def cancel(self) -> None:
        """The client went away: every row leaves the batch at the next step."""
        for request in self.requests:
            request.cancel()

    def has_reports(self) -> bool:
        """Whether reports wait to be read (a stream sends them together)."""
        return not self._queue.empty()

    async def finals(self) -> list[dict]:
        """Every row's final output, in row order."""
        rows: list[dict | None] = [None] * len(self.requests)
        async for index, report in self.reports():
            if "final" in report:
                rows[index] = report["final"]
        return rows

    async def reports(self) -> AsyncIterator[tuple[int, dict]]:
        """(row, report) as the engine sends them, until every row's final report."""
        left = len(self.requests)
        while left:
            index, report = await self._queue.get()
            left -= "final" in report
            yield index, report


async def sse_events(request: EngineRequest, model: str) -> AsyncIterator[str]:
    """A streaming request's server-sent events: per choice, its text as it comes (chat
    opens each choice with the assistant's role), a last chunk with its finish_reason, the
    usage when asked, then `[DONE]`. A row that fails after the stream began ends it with
    an error event in OpenAI's shape (the openai client raises it)."""
    endpoint, work = request.endpoint, request.work
    request_id = f"{'cmpl' if endpoint == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex}"
    sent = [0] * len(request.requests)  # characters streamed per choice (completions' text_offset)
    if endpoint == "chat/completions":
        for index in range(len(request.requests)):
            yield server_sent(stream_chunk(endpoint, request_id, model, index, None, None, None))
    finals: list[dict | None] = [None] * len(request.requests)
    async for index, report in request.reports():
        final = report.get("final")
        if final is not None and final["error"]:
            error = row_error([final], ROW_NAMES[endpoint]) or ApiError(500, final["error"], "internal")
            yield server_sent(error_body(error.status, error.message, error.code))
            request.cancel()
            break
        delta = report["delta"] if final is None else final.get("delta", "")
        logprobs = report.get("logprobs") if final is None else final.get("delta_logprobs")
        reason = None if final is None else final["finish_reason"]
        yield server_sent(stream_chunk(endpoint, request_id, model, index, delta, logprobs, reason, sent[index]))
        sent[index] += len(delta)
        if final is not None:
            finals[index] = final
    else:
        if work.include_usage:
            yield server_sent(usage_chunk(endpoint, request_id, model, finals, work.copies))
    yield server_sent("[DONE]")


def _params(work: Work, i: int) -> dict:
    """Input i's own parameters (max_new_tokens, temperature)."""
    return {name: values[i] for name, values in work.params.items()}
