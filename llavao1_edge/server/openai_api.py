"""OpenAI's chat completions: `message.content` is the CONCLUSION, `message.reasoning_content` (mirrored as
`reasoning`) the SUMMARY, CAPTION and REASONING with their tags, and `llavao1` what `run --json` prints.

Streamed, the chunks follow OpenAI's rules: one id, the role in the first delta, index 0, reasoning deltas
before any content, never both in one delta, a last chunk with finish_reason, a usage chunk with
`choices: []` when stream_options.include_usage asks, then `data: [DONE]`. Greedy decoding streams token by
token; a search streams each stage when it is chosen. With `llavao1: {"events": true}` chunks with an empty
delta carry the search's events (candidates finished, verdicts, stages chosen) for UIs that show them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from ..trace import Event, SearchResult
from .stream import AnswerSplitter, answer_parts, answer_pieces
from .workers import Job

SHOWN_EVENTS = ("prompt_ready", "stage_started", "candidate_finished", "judge_decision", "stage_chosen")


def wanted(job: Job):
    """The events a response uses: none but the result unstreamed; the answer's pieces (and the search's
    events when asked) streamed."""
    if not job.options["stream"]:
        return lambda ev: False
    tokens = job.search.strategy == "greedy"
    return lambda ev: bool(answer_pieces(ev, tokens)) or (job.events and ev.kind in SHOWN_EVENTS)


def finish_reason(result: SearchResult) -> str:
    """'length' when a budget or the context cut the answer short, else 'stop'."""
    cut = any("token budget" in f or "KV cache" in f for f in result.flags)
    return "length" if cut else "stop"


def usage(result: SearchResult) -> dict:
    prompt, completion = result.tokens.get("prompt", 0), result.tokens.get("answer", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def event_json(ev: Event) -> dict:
    data = {k: v for k, v in ev.data.items() if k != "result"}
    return {"kind": ev.kind, "stage": ev.stage, "candidate": ev.candidate, "text": ev.text, "data": data}


MEDIA_TYPE = "text/event-stream"


def reply(job: Job, result: SearchResult, model: str, started: float) -> dict:
    """The whole completion (not streamed)."""
    reasoning, content = answer_parts(result.text)
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "logprobs": None,
                                         "finish_reason": finish_reason(result)}],
            "usage": usage(result), "llavao1": result.to_json()}


async def stream(job: Job, events: AsyncIterator[Event], first: Event, model: str, started: float) -> AsyncIterator[str]:
    """The SSE stream of one completion; `first` is the search's first event (already received)."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **(extra or {})}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    splitter = AnswerSplitter()
    tokens = job.search.strategy == "greedy"
    result = None

    async def all_events():
        yield first
        async for ev in events:
            yield ev

    async for ev in all_events():
        if ev.kind == "done":
            result = ev.data["result"]
            reasoning, content = splitter.feed("", final=True)
        else:
            reasoning, content = splitter.feed(answer_pieces(ev, tokens))
        if reasoning:
            yield chunk({"reasoning_content": reasoning, "reasoning": reasoning})
        if content:
            yield chunk({"content": content})
        if job.events and ev.kind in SHOWN_EVENTS:
            yield chunk({}, extra={"llavao1": {"event": event_json(ev)}})
    yield chunk({}, finish_reason(result), {"llavao1": result.to_json()} if job.events else None)
    if job.options.get("include_usage"):
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                "usage": usage(result)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "llavao1-edge"}]}
