"""OpenAI and Ollama chat request bodies, checked and turned into a Job. Every problem is a RequestError:
an HTTP status, one line naming the field and what is wrong, and OpenAI's error `type`/`code`."""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace

from ..images import ImageError, load_image
from ..options import SearchConfig, from_mapping
from .config import ServerConfig
from .workers import Job

# OpenAI fields clients send that change nothing here (their defaults), accepted and ignored
IGNORED = {"user", "metadata", "store", "service_tier", "frequency_penalty", "presence_penalty", "logit_bias",
           "parallel_tool_calls", "prediction", "modalities", "reasoning_effort", "top_logprobs"}
OPENAI_FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "seed", "max_tokens",
                 "max_completion_tokens", "n", "tools", "tool_choice", "functions", "function_call", "stop",
                 "logprobs", "response_format", "llavao1"} | IGNORED
OLLAMA_FIELDS = {"model", "messages", "stream", "think", "options", "format", "keep_alive", "tools"}
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def openai(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {kind} from {low} to {high}, got {value!r}", param=name)
    return value


def decode_image(data: str | bytes, cfg: ServerConfig, where: str):
    """A base64 image (or a data: URI of one) -> an RGB PIL image; oversized or unreadable images are 400s."""
    if isinstance(data, str) and data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(f"{where}: a data URI must be base64 (data:image/png;base64,...)", param=where)
    if not isinstance(data, str | bytes):
        raise RequestError(f"{where}: an image must be a base64 string", param=where)
    if len(data) > cfg.max_image_bytes * 4 // 3 + 4:
        raise RequestError(f"{where}: the image is over the limit of {cfg.max_image_bytes:,} bytes", param=where,
                           status=413, code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not valid base64", param=where) from None
    try:
        return load_image(raw)
    except ImageError as e:
        raise RequestError(f"{where}: {str(e).replace(f'image bytes ({len(raw)} bytes): ', '')}", param=where) from None


def _text_and_images(content, where: str, cfg: ServerConfig) -> tuple[str, list]:
    """An OpenAI message's content: a string, or parts of type text and image_url (data: URIs only)."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise RequestError(f"{at}: only data: URIs are accepted (the server never fetches URLs or files)",
                                   param=at)
            images.append(decode_image(url, cfg, at))
        else:
            raise RequestError(f"{at}: a part must be {{type: text, text}} or {{type: image_url, image_url: "
                               f"{{url: data:...}}}}, got type {kind!r}", param=at)
    return "\n".join(texts), images


def _conversation(turns: list[tuple[str, str, list]], vision: bool) -> tuple[str, object, list[tuple[str, str]]]:
    """(question, image, history) from (role, text, images) turns: the last user turn is the question, the
    turns before it the history (system text joins the first user turn); one image per request."""
    images = [img for _, _, imgs in turns for img in imgs]
    if len(images) > 1:
        raise RequestError(f"{len(images)} images: the server reasons about one image per request (start a new "
                           "conversation for another image)", param="messages")
    if images and not vision:
        raise RequestError("this model has no vision projector: it cannot take images", param="messages")
    if not turns or turns[-1][0] != "user":
        raise RequestError("the last message must be the user's question", param="messages")
    system = "\n".join(text for role, text, _ in turns if role == "system")
    history = [(role, text) for role, text, _ in turns[:-1] if role != "system"]
    question = turns[-1][1]
    if system:
        if history:
            history[0] = (history[0][0], f"{system}\n\n{history[0][1]}")
        else:
            question = f"{system}\n\n{question}"
    if not question.strip():
        raise RequestError("the question is empty", param="messages")
    return question, (images[0] if images else None), history


def _search(cfg: ServerConfig, extension, max_candidates: int, **fields) -> SearchConfig:
    """The server's default search, the request's llavao1 extension over it, then its standard fields."""
    if extension is not None and not isinstance(extension, dict):
        raise RequestError("llavao1 must be an object of search settings", param="llavao1")
    settings = {k: v for k, v in (extension or {}).items() if k != "events"}
    try:
        search = from_mapping(SearchConfig, settings, cfg.search)
        search = replace(search, **{k: v for k, v in fields.items() if v is not None})
        search.validate()
    except ValueError as e:
        raise RequestError(f"llavao1: {e}", param="llavao1") from None
    if search.candidates > max_candidates:
        raise RequestError(f"llavao1: candidates {search.candidates} is over this server's {max_candidates}",
                           param="llavao1")
    return search


def _budget(tokens, strategy: str) -> dict:
    """max_tokens means what it means for the candidates: a stage's budget in a stage search, the answer's
    otherwise."""
    if tokens is None:
        return {}
    return {"max_stage_tokens": tokens} if strategy in ("stage", "sentence") else {"max_answer_tokens": tokens}


def _fields(body, known: set[str]) -> dict:
    """The body as an object of known fields."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", param=unknown[0])
    return body


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    return messages


def served(name, model_ids: tuple[str, ...]) -> bool:
    """Whether `name` is what this server serves (Ollama clients add ':latest')."""
    return name in model_ids or f"{name}".removesuffix(":latest") in model_ids


def openai_job(body, cfg: ServerConfig, model_ids: tuple[str, ...], vision: bool, max_candidates: int) -> Job:
    body = _fields(body, OPENAI_FIELDS)
    model = body.get("model")
    if model not in model_ids:
        raise RequestError(f"model {model!r} is not served here; this server serves {model_ids[0]!r}", param="model",
                           code="model_not_found")
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: the search already samples and chooses among candidates "
                           "(llavao1.candidates)", param="n")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name):
            raise RequestError(f"{name} are not supported", param=name, code="unsupported")
    if body.get("stop") not in (None, [], ""):
        raise RequestError("stop is not supported: the answer ends with its CONCLUSION", param="stop")
    if body.get("logprobs"):
        raise RequestError("logprobs are not supported (the llavao1 object holds each candidate's score)",
                           param="logprobs")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise RequestError("response_format other than text is not supported", param="response_format")
    turns = []
    for i, m in enumerate(_messages(body)):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
        text, images = _text_and_images(m.get("content"), where, cfg)  # reasoning fields are ignored
        turns.append((m["role"], text, images))
    question, image, history = _conversation(turns, vision)
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    _number({"max_tokens": tokens}, "max_tokens", 1, cfg.max_tokens, integer=True)
    extension = body.get("llavao1")
    search = _search(cfg, extension, max_candidates, temperature=_number(body, "temperature", 0, 2),
                     top_p=_number(body, "top_p", 0.01, 1), seed=_number(body, "seed", 0, 2**63 - 1, integer=True))
    search = replace(search, **_budget(tokens, search.strategy))
    stream = body.get("stream", False)
    opts = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(opts, dict):
        raise RequestError("stream must be true or false, stream_options an object", param="stream")
    events = bool((extension or {}).get("events"))
    return Job(question, image, search, history, events,
               {"stream": stream, "include_usage": bool(opts.get("include_usage")), "model": model})


def ollama_job(body, cfg: ServerConfig, model_ids: tuple[str, ...], vision: bool, max_candidates: int) -> Job:
    body = _fields(body, OLLAMA_FIELDS)
    model = body.get("model")
    if not served(model, model_ids):
        raise RequestError(f"model {model!r} not found; this server serves {model_ids[0]!r}", status=404,
                           code="model_not_found")
    if body.get("tools"):
        raise RequestError("tools are not supported", param="tools")
    if body.get("format"):
        raise RequestError("format is not supported: the answer is the four stages", param="format")
    turns = []
    for i, m in enumerate(_messages(body)):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), str):
            raise RequestError(f"{where} must have a role ({', '.join(ROLES)}) and a string content", param=where)
        imgs = m.get("images") or []
        if not isinstance(imgs, list):
            raise RequestError(f"{where}.images must be a list of base64 strings", param=where)
        turns.append((m["role"], m.get("content", ""), [decode_image(b, cfg, f"{where}.images[{j}]")
                                                      for j, b in enumerate(imgs)]))
    question, image, history = _conversation(turns, vision)
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise RequestError("options must be an object", param="options")
    tokens = _number(options, "num_predict", 1, cfg.max_tokens, integer=True)
    search = _search(cfg, None, max_candidates, temperature=_number(options, "temperature", 0, 2),
                     top_p=_number(options, "top_p", 0.01, 1), seed=_number(options, "seed", 0, 2**63 - 1, integer=True))
    search = replace(search, **_budget(tokens, search.strategy))
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    return Job(question, image, search, history, False,
               {"stream": stream, "think": body.get("think") is not False, "model": model})
