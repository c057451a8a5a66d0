"""Ollama's chat API, so Ollama clients work unchanged: `message.thinking` carries the SUMMARY, CAPTION and
REASONING stages, `message.content` the CONCLUSION; streamed as NDJSON, ending with a `done` line that holds
the durations (nanoseconds) and token counts Ollama reports."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from .. import __version__
from ..trace import Event, SearchResult
from .openai_api import finish_reason
from .stream import AnswerSplitter, answer_parts, answer_pieces
from .workers import Job


def wanted(job: Job):
    """The events a response uses: none but the result unstreamed; the answer's pieces streamed."""
    tokens = job.search.strategy == "greedy"
    return (lambda ev: bool(answer_pieces(ev, tokens))) if job.options["stream"] else (lambda ev: False)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _done(job: Job, result: SearchResult, model: str, started: float) -> dict:
    t, tok = result.timings, result.tokens
    ns = 1_000_000_000
    return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": finish_reason(result), "total_duration": int((time.perf_counter() - started) * ns),
            "load_duration": 0, "prompt_eval_count": tok.get("prompt", 0),
            "prompt_eval_duration": int((t.get("prefill_s", 0) + t.get("image_encode_s", 0)) * ns),
            "eval_count": tok.get("answer", 0), "eval_duration": int((t.get("decode_s", 0) + t.get("judge_s", 0)) * ns)}


MEDIA_TYPE = "application/x-ndjson"


def reply(job: Job, result: SearchResult, model: str, started: float) -> dict:
    reasoning, content = answer_parts(result.text)
    out = _done(job, result, model, started)
    out["message"] = {"role": "assistant", "content": content, **({"thinking": reasoning} if job.options["think"]
                                                                  else {})}
    return out


async def stream(job: Job, events: AsyncIterator[Event], first: Event, model: str, started: float) -> AsyncIterator[str]:
    """NDJSON lines: thinking, then content, then the done line."""
    splitter = AnswerSplitter()
    tokens = job.search.strategy == "greedy"

    async def all_events():
        yield first
        async for ev in events:
            yield ev

    async for ev in all_events():
        final = ev.kind == "done"
        reasoning, content = splitter.feed("" if final else answer_pieces(ev, tokens), final=final)
        if reasoning and job.options["think"]:
            yield json.dumps({"model": model, "created_at": _now(), "message": {"role": "assistant", "content": "",
                              "thinking": reasoning}, "done": False}) + "\n"
        if content:
            yield json.dumps({"model": model, "created_at": _now(), "message": {"role": "assistant",
                              "content": content}, "done": False}, ensure_ascii=False) + "\n"
        if final:
            yield json.dumps(_done(job, ev.data["result"], model, started)) + "\n"


def tags(model_id: str, path: str, family: str, quant: str) -> dict:
    st = os.stat(path)
    modified = datetime.fromtimestamp(st.st_mtime, UTC).isoformat().replace("+00:00", "Z")
    return {"models": [{"name": model_id, "model": model_id, "modified_at": modified, "size": st.st_size,
                        "digest": "", "details": {"format": "gguf", "family": family, "families": [family],
                                                  "parameter_size": "", "quantization_level": quant}}]}


def show(model_id: str, family: str, quant: str, vision: bool) -> dict:
    """What Ollama's /api/show tells a client about the model: its format and what it can do."""
    return {"modelfile": "", "parameters": "", "template": "", "model_info": {},
            "details": {"format": "gguf", "family": family, "families": [family], "parameter_size": "",
                        "quantization_level": quant},
            "capabilities": ["completion", *(["vision"] if vision else []), "thinking"]}


def version() -> dict:
    return {"version": __version__}
