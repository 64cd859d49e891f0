"""The plumbing of a streamed answer (chapter 10): several engine streams merged into one (a request with n
choices or several prompts), Server-Sent Events written so that no client splits them wrongly, and the watch for a
client that hung up. The endpoints themselves are openai_api.py's."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import Request

from minillm.outputs import RequestOutput


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (stream index, output). Leaving early cancels every pump, and a
    cancelled pump closes its stream, which aborts that request in the engine.
    Outputs are cumulative, so a stream's newer output replaces one not taken yet: a client that stops reading holds
    one output per choice here, not one per step (a copy of all its tokens each: at 8,192 tokens, ~270 MB a
    choice). Streams take turns (a dict keeps the order in which its keys came back)."""
    latest: dict[int, RequestOutput | Exception] = {}
    ready = asyncio.Event()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                latest[i] = out
                ready.set()
        except Exception as err:  # e.g. the engine refused the request: the consumer raises it
            latest[i] = err
            ready.set()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            if not latest:  # (one thread: no pump runs between this check and the wait)
                ready.clear()
                await ready.wait()
                continue
            i = next(iter(latest))
            item = latest.pop(i)
            if isinstance(item, Exception):
                raise item
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disconnected(raw: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


# str.splitlines ends a line at U+2028, U+2029 and U+0085, and so do httpx's aiter_lines and `minillm bench serve`;
# JSON keeps them raw (ensure_ascii=False), so an event whose text held one came apart. Escaped, as only strings
# can hold them, they mean the same and break no one's lines (SSE itself breaks lines only at CR and LF).
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _event(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS)}\n\n"

