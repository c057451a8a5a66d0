"""llavao1-edge: offline step-by-step vision-language reasoning with stage-level beam search.

Importing this package is light: no torch, no transformers, and llama.cpp loads only when a
model is opened.
"""

from .api import Reasoner, shipped_model_paths
from .options import EngineConfig, SearchConfig
from .stages import (
    STAGE_NAMES,
    STAGES,
    ParsedAnswer,
    StageStreamParser,
    parse_answer,
    render_answer,
)
from .trace import SearchResult

__version__ = "0.1.0"

__all__ = [
    "STAGES", "STAGE_NAMES", "EngineConfig", "ParsedAnswer", "Reasoner", "SearchConfig", "SearchResult",
    "StageStreamParser", "__version__", "parse_answer", "render_answer", "shipped_model_paths",
]
