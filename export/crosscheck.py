"""Our GGUF writer against llama.cpp's own converter, on the same checkpoint.

Both pairs are written in F32, then compared three ways: metadata (keys only one file has, values that
differ), tensors (names, shapes, values) and behaviour, which is what matters: the logits llama.cpp
computes from each pair for a text prompt and an image prompt, and each pair's image embeddings. A
behaviour gap of 0 means llama.cpp cannot tell the two pairs apart on these prompts.

llama.cpp's converter names BPE pre-tokenizers by hashing the output of tokenizers it knows; a tokenizer
trained elsewhere is unknown to it. It is told the name our writer chose (read from regular expressions,
models/gguf_vocab.py), the one change made to its run. It runs from a llama.cpp source folder (the one
inside llama-cpp-python's source distribution will do) in a child process, with its own requirements
(requirements/requirements-convert_hf_to_gguf.txt: sentencepiece among them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llavao1_edge.prompting import MEDIA_MARKER, ChatTemplate

from .errors import ExportError

# Run llama.cpp's converter with one change: the pre-tokenizer name it cannot find by hash.
_RUNNER = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""
OWN_KEYS = ("llavao1.", "general.")  # ours alone (provenance, stage format) or free text: reported, not differences


@dataclass
class Crosscheck:
    model: str
    ours: list[str]  # text, mmproj
    theirs: list[str]
    only_ours: dict[str, list[str]] = field(default_factory=dict)  # file -> keys only our file has
    only_theirs: dict[str, list[str]] = field(default_factory=dict)
    values_differ: dict[str, dict[str, list]] = field(default_factory=dict)  # file -> key -> [ours, theirs]
    tensors_differ: dict[str, list[str]] = field(default_factory=dict)  # file -> "name: why"
    tensor_max_abs: dict[str, float] = field(default_factory=dict)  # file -> max |Δ| over same-named tensors
    behaviour: dict[str, float] = field(default_factory=dict)  # quantity -> max |Δ| between the pairs
    notes: list[str] = field(default_factory=list)

    @property
    def same_behaviour(self) -> bool:
        return all(v == 0.0 for v in self.behaviour.values())

    def to_json(self) -> dict:
        return {**asdict(self), "same_behaviour": self.same_behaviour}

    def table(self) -> str:
        lines = [f"checkpoint {self.model}"]
        for kind in [k for k in ("text", "mmproj") if k in self.tensor_max_abs]:
            lines.append(f"{kind}:")
            lines += [f"  only ours:   {k}" for k in self.only_ours.get(kind, [])]
            lines += [f"  only theirs: {k}" for k in self.only_theirs.get(kind, [])]
            lines += [f"  differs:     {k}: ours {v[0]!r}, theirs {v[1]!r}" for k, v in
                      self.values_differ.get(kind, {}).items()]
            lines += [f"  tensor:      {t}" for t in self.tensors_differ.get(kind, [])]
            lines.append(f"  tensors max |Δ|: {self.tensor_max_abs.get(kind, 0.0):.3g}")
        lines.append("llama.cpp on each pair, max |Δ| between them:")
        lines += [f"  {k:<18} {v:.3g}" for k, v in self.behaviour.items()]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("same behaviour" if self.same_behaviour else "DIFFERENT behaviour")
        return "\n".join(lines)


def _fields(path: str) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (shape, type name, data as float32))."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name,
                        dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)) for t in r.tensors}
    return meta, tensors


def _compare_files(kind: str, ours: str, theirs: str, out: Crosscheck) -> None:
    (mo, to), (mt, tt) = _fields(ours), _fields(theirs)
    mine = {k for k in mo if not k.startswith(OWN_KEYS)}
    other = {k for k in mt if not k.startswith(OWN_KEYS)}
    out.only_ours[kind] = sorted(mine - other)
    out.only_theirs[kind] = sorted(other - mine)
    out.values_differ[kind] = {k: [mo[k], mt[k]] for k in sorted(mine & other) if mo[k] != mt[k]}
    diffs, worst = [], 0.0
    for name in sorted(set(to) | set(tt)):
        if name not in tt or name not in to:
            diffs.append(f"{name}: only {'ours' if name in to else 'theirs'}")
            continue
        (so, ko, do), (st, kt, dt) = to[name], tt[name]
        if so != st:
            diffs.append(f"{name}: shape ours {so}, theirs {st}")
        elif ko != kt:
            diffs.append(f"{name}: type ours {ko}, theirs {kt}")
        if do.shape == dt.shape:
            worst = max(worst, float(np.abs(do - dt).max()) if do.size else 0.0)
    out.tensors_differ[kind], out.tensor_max_abs[kind] = diffs, worst


def _convert(llama_cpp: Path, model: Path, pre: str | None, dest: Path, *extra: str) -> str | None:
    """Run llama.cpp's converter into dest; None when it wrote the file, else its last error line."""
    cmd = [sys.executable, "-c", _RUNNER, str(llama_cpp), pre or "default", str(model), "--outtype", "f32",
           "--outfile", str(dest), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0 and dest.is_file():
        return None
    return (proc.stderr.strip().splitlines() or ["no output"])[-1]


def _behaviour(pairs: list[tuple[Path, Path]], template: str | None, image, threads: int) -> dict:
    """Text logits, image-prompt logits and image embeddings from each pair (in a child process each)."""
    prompt = ChatTemplate(template, "crosscheck")
    got = []
    with tempfile.TemporaryDirectory() as tmp:
        image.save(Path(tmp) / "image.png")
        for i, (text, mmproj) in enumerate(pairs):
            req = {"model": str(text), "mmproj": str(mmproj), "text_prompt": prompt.user_turn("Describe the scene."),
                   "image_prompt": prompt.user_turn("What is in the image?", MEDIA_MARKER), "text_continuation": [],
                   "image_continuation": [], "image": str(Path(tmp) / "image.png"), "threads": threads}
            (Path(tmp) / f"req{i}.json").write_text(json.dumps(req))
            proc = subprocess.run([sys.executable, "-m", "llavao1_export.llama_probe", str(Path(tmp) / f"req{i}.json"),
                                   str(Path(tmp) / f"out{i}.npz")], capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ExportError(f"llama.cpp failed on {text}: {last}")
            with np.load(Path(tmp) / f"out{i}.npz") as z:
                got.append({k: z[k] for k in z.files})
    a, b = got
    res = {}
    for key in ("text_logits", "image_last_logits", "image_embd"):
        res[key] = float(np.abs(a[key] - b[key]).max()) if a[key].shape == b[key].shape else float("inf")
    res["token_ids"] = 0.0 if (np.array_equal(a["text_ids"], b["text_ids"]) and
                               np.array_equal(a["image_ids"], b["image_ids"])) else float("inf")
    return res


def crosscheck(model_dir: str | Path, llama_cpp: str | Path, out_dir: str | Path, threads: int = 0,
               log=lambda s: None) -> Crosscheck:
    from PIL import Image

    from llavao1_edge.gguf_header import read_header
    from llavao1_models.checkpoint import load_checkpoint

    from .gguf_convert import convert_to_gguf

    llama_cpp, model, out = Path(llama_cpp), Path(model_dir), Path(out_dir)
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"{llama_cpp}: not a llama.cpp source folder (no convert_hf_to_gguf.py)")
    ckpt = load_checkpoint(model, weights=False)
    out.mkdir(parents=True, exist_ok=True)
    log("writing our pair (F32)")
    ours = convert_to_gguf(model, out, "f32")
    pre = read_header(ours.text).fields.get("tokenizer.ggml.pre")
    log("writing llama.cpp's pair (F32)")
    text, mmproj = out / "theirs-f32.gguf", out / "mmproj-theirs-f32.gguf"
    failed = _convert(llama_cpp, model, pre.contents() if pre else None, text)
    if failed:
        raise ExportError(f"llama.cpp's converter failed on {model}: {failed}")
    res = Crosscheck(str(model), [str(ours.text), str(ours.mmproj)], [str(text)])
    _compare_files("text", str(ours.text), str(text), res)
    failed = _convert(llama_cpp, model, None, mmproj, "--mmproj")
    if failed:  # image prompts then run both text models with our projector
        res.notes.append(f"llama.cpp's converter does not write this projector ({failed}); image prompts use ours")
        mmproj = ours.mmproj
    else:
        res.theirs.append(str(mmproj))
        _compare_files("mmproj", str(ours.mmproj), str(mmproj), res)
    log("running both pairs in llama.cpp")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (61, 97, 3), dtype=np.uint8))  # not square, structured noise
    res.behaviour = _behaviour([(ours.text, ours.mmproj), (text, mmproj)], ckpt.chat_template, image, threads)
    return res
