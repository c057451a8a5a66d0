"""gguf-py's constants (every GGUF key, tensor name and type) without the rest of its package.

`import gguf` also loads its reader, writer, quantization and metadata code (yaml among them): about 40 ms
of every `llavao1-edge run`'s start, for names alone. The module is loaded once under its own name,
`gguf.constants`, so a later `import gguf` (export, tests) reuses it and its enums stay the same objects
(`from gguf import constants` finds it; the package's `constants` attribute is set only when gguf loaded it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _load():
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("gguf")  # finds the package without running its __init__
    if package is None or not package.submodule_search_locations:
        raise ImportError("the gguf package is not installed (pip install gguf)")
    path = Path(next(iter(package.submodule_search_locations))) / "constants.py"
    spec = importlib.util.spec_from_file_location("gguf.constants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gguf.constants"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["gguf.constants"]
        raise
    return module


_C = _load()
GGML_QUANT_SIZES = _C.GGML_QUANT_SIZES
GGMLQuantizationType = _C.GGMLQuantizationType
GGUFValueType = _C.GGUFValueType
Keys = _C.Keys
LlamaFileType = _C.LlamaFileType
MODEL_TENSOR = _C.MODEL_TENSOR
TENSOR_NAMES = _C.TENSOR_NAMES
