"""The Python API applications embed.

    from llavao1_edge import Reasoner
    with Reasoner() as r:                       # the shipped model, or Reasoner("m.gguf", "mmproj.gguf"),
                                                # or Reasoner.from_hf("ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0")
        result = r.ask("photo.jpg", "How many red circles are there?", strategy="stage", candidates=4)
        print(result.answer, result.stages["reasoning"])
        for event in r.stream(image_bytes, "What color is the square?"):
            ...

Threads: one Reasoner runs one search at a time (calls are serialised by a lock). For parallel
questions, open one Reasoner per thread; each holds its own llama.cpp context.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path

from .engine import Engine, EngineConfig
from .images import ImageSource
from .search import Event, SearchConfig, SearchResult, run_search, search_events

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "shapes-tiny"


class ModelNotFound(FileNotFoundError):
    pass


def shipped_model(name: str = DEFAULT_MODEL) -> dict[str, Path]:
    """The files the package ships under llavao1_edge/models/NAME/, as its model.json names them:
    "text" (the quantized text model the runtime opens), "mmproj", "unquantized" (the text model's F16 source)."""
    folder = MODELS_DIR / name
    try:
        manifest = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelNotFound(f"no shipped model {name!r} in {folder}; pass --model TEXT.gguf --mmproj MMPROJ.gguf") from None
    return {k: folder / v for k, v in manifest.items() if k in ("text", "mmproj", "unquantized")}


def shipped_model_paths(name: str = DEFAULT_MODEL) -> tuple[Path, Path]:
    """The text model and projector the package ships."""
    files = shipped_model(name)
    return files["text"], files["mmproj"]


def _search_config(config: SearchConfig | None, overrides: dict) -> SearchConfig:
    names = {f.name for f in fields(SearchConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown search settings: {', '.join(unknown)}")
    return replace(config or SearchConfig(), **overrides)


class Reasoner:
    """A model opened for questions. `close()` (or a with-block) frees its native memory."""

    def __init__(self, model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None,
                 engine_config: EngineConfig | None = None, **engine_overrides):
        if model is None:
            model, shipped_proj = shipped_model_paths()
            mmproj = mmproj or shipped_proj
        cfg = replace(engine_config or EngineConfig(), **engine_overrides)
        self.engine = Engine(model, mmproj, cfg)
        self._lock = threading.Lock()

    @classmethod
    def from_hf(cls, ref: str, cache_dir: str | os.PathLike | None = None, offline: bool | None = None,
                engine_config: EngineConfig | None = None, **engine_overrides) -> Reasoner:
        """A model from a Hugging Face repository, "ORG/NAME[:QUANT]" (a GGUF text model and its mmproj):
        pulled into the cache on first use (the chosen files, and a progress bar when stderr is a terminal, on
        stderr), then opened from the cache without the network. `offline=True` (or HF_HUB_OFFLINE=1)
        makes a model that is not cached a `HubError` (a ValueError) instead of a download."""
        from .hub import pull

        model = pull(ref, cache_dir, offline=offline)
        return cls(model.text, model.mmproj, engine_config, **engine_overrides)

    def ask(self, image: ImageSource | None, question: str, config: SearchConfig | None = None, *,
            on_event: Callable[[Event], None] | None = None,
            cancel: threading.Event | Callable[[], bool] | None = None,
            history: Sequence[tuple[str, str]] = (), **settings) -> SearchResult:
        """Answer one question about one image (or none). Settings override SearchConfig fields; `history`
        holds earlier turns of a conversation as (role, text) pairs, role "user" or "assistant"."""
        cfg = _search_config(config, settings)
        with self._lock:
            return run_search(self.engine, image, question, cfg, on_event, cancel, history)

    def stream(self, image: ImageSource | None, question: str, config: SearchConfig | None = None, *,
               cancel: threading.Event | Callable[[], bool] | None = None,
               history: Sequence[tuple[str, str]] = (), **settings) -> Iterator[Event]:
        """Events as the search runs; the last is "done" with the result in data["result"]."""
        cfg = _search_config(config, settings)
        with self._lock:
            yield from search_events(self.engine, image, question, cfg, cancel, history)

    def close(self) -> None:
        with self._lock:
            self.engine.close()

    def __enter__(self) -> Reasoner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
