"""Check that exported files compute what the original model computes.

The same text prompt and image prompt go through transformers (fp32, the reference), llama.cpp
(F32 KV cache, flash attention off, in a child process) and optionally onnxruntime. Reported per
path: max |Δlogit| over the prompt, top-1 agreement along the reference's greedy continuation,
max |Δ| of the image embeddings, and pass/fail against thresholds for unquantized files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llavao1_edge.formats import type_of_file
from llavao1_edge.prompting import MEDIA_MARKER, ChatTemplate

from .errors import ExportError

TEXT_THRESHOLD = 1e-4  # F32 GGUF text logits
# Image embeddings, towers without CLS, relative to max(1, max |reference|): llama.cpp's fp16 im2col and
# GELU tables give an error that grows with the activations (1e-3 of |x| ~ 30 in a trained tower).
IMAGE_THRESHOLD = 5e-3
ONNX_THRESHOLD = 1e-4  # ONNX fp32 logits
TEXT_PROMPT = "Count the red circles, then say whether there are more circles than squares."
IMAGE_QUESTION = "What is in the image? Describe each object."
CONTINUATION = 16  # greedy tokens compared


@dataclass
class PathReport:
    path: str  # "gguf" | "onnx"
    files: list[str]
    quantized: bool
    text_max_abs_logit: float | None = None
    text_top1_agreement: float | None = None
    image_max_abs_embd: float | None = None
    image_rel_embd: float | None = None  # max |Δ| / max(1, max |reference|): what the threshold judges
    image_max_abs_logit: float | None = None
    image_top1_agreement: float | None = None
    tokens_match: bool = True
    checks: dict[str, bool] = field(default_factory=dict)  # threshold name -> passed (unquantized only)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.tokens_match and all(self.checks.values())

    def compare_image_embeddings(self, got: np.ndarray, reference: np.ndarray) -> None:
        """Set the absolute and the relative (what the threshold judges) image embedding error."""
        self.image_max_abs_embd = float(np.abs(got - reference).max())
        self.image_rel_embd = self.image_max_abs_embd / max(1.0, float(np.abs(reference).max()))


@dataclass
class VerifyReport:
    model: str
    paths: list[PathReport]

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.paths)

    def to_json(self) -> dict:
        return {"model": self.model, "passed": self.passed,
                "paths": [{**asdict(p), "passed": p.passed} for p in self.paths]}

    def table(self) -> str:
        def f(v):
            return "-" if v is None else (f"{v:.2e}" if isinstance(v, float) and v < 0.01 else f"{v:.4g}")
        rows = [f"{'path':<6} {'quantized':<9} {'text max|Δlogit|':>17} {'text top1':>9} {'image max|Δembd|':>17} "
                f"{'(relative)':>10} {'image max|Δlogit|':>18} {'image top1':>10}  result"]
        for p in self.paths:
            verdict = ("pass" if p.passed else "FAIL") if p.checks or not p.tokens_match else "reported"
            rows.append(f"{p.path:<6} {str(p.quantized):<9} {f(p.text_max_abs_logit):>17} {f(p.text_top1_agreement):>9} "
                        f"{f(p.image_max_abs_embd):>17} {f(p.image_rel_embd):>10} {f(p.image_max_abs_logit):>18} "
                        f"{f(p.image_top1_agreement):>10}  {verdict}")
            rows += [f"       note: {n}" for n in p.notes]
        return "\n".join(rows)


class Reference:
    """The transformers model in fp32 and the inputs every path gets: prompts rendered through the model's chat
    template as the runtime renders them, the image prepared by mtmd's rule for the family (models.family)."""

    def __init__(self, model_dir: str | Path):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from llavao1_models.checkpoint import load_checkpoint

        self.ckpt = load_checkpoint(model_dir, weights=False)  # clear errors for broken folders
        family = self.ckpt.family
        if family.inputs is None:
            raise ExportError(f"{model_dir}: verify does not support the {family.name} family yet")
        self.torch = torch
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.vision = family.inputs(self.model.config.to_dict(), self.ckpt.processor, self.tok)
        template = ChatTemplate(self.ckpt.chat_template, self.ckpt.name, self.tok.eos_token or "")
        self.text_prompt = template.user_turn(TEXT_PROMPT)
        self.image_prompt = template.user_turn(IMAGE_QUESTION, MEDIA_MARKER)  # what the runtime renders
        self.image = self._test_image()

    def _test_image(self):
        """Not square and not a multiple of any patch or tile, so every resizing rule is exercised."""
        from PIL import Image, ImageDraw

        s = self.model.config.vision_config.to_dict().get("image_size") or 112
        img = Image.new("RGB", (s * 3 // 2 + 5, s - 3), (235, 235, 232))
        d = ImageDraw.Draw(img)
        d.ellipse([s * 0.1, s * 0.2, s * 0.5, s * 0.6], fill=(215, 40, 40))
        d.rectangle([s * 0.7, s * 0.3, s * 1.1, s * 0.7], fill=(40, 90, 225))
        d.polygon([(s * 1.2, s * 0.8), (s * 1.4, s * 0.8), (s * 1.3, s * 0.5)], fill=(40, 165, 60))
        return img

    def text_ids(self) -> list[int]:
        return self.tok(self.text_prompt)["input_ids"]  # BOS where the tokenizer adds it, as llama.cpp must

    def image_ids(self) -> list[int]:
        return self.tok(self.image_prompt.replace(MEDIA_MARKER, self.vision.prompt(*self.image.size)))["input_ids"]

    def image_arrays(self) -> dict:
        return {k: self.torch.from_numpy(v) for k, v in self.vision.arrays(self.image).items()}

    def run(self) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            ids = torch.tensor([self.text_ids()])
            text_logits = self.model(input_ids=ids).logits[0].numpy()
            text_cont = self._greedy(ids, {})
            iids = torch.tensor([self.image_ids()])
            arrays = self.image_arrays()
            inputs = {**arrays, **self.vision.sequence_inputs(iids)}
            image_logits = self.model(input_ids=iids, **inputs).logits[0, -1].numpy()
            image_cont = self._greedy(iids, inputs)
            chunks = [c.numpy() for c in self.vision.features(self.model, arrays)]
        return {"text_logits": text_logits, "text_cont": text_cont, "image_last_logits": image_logits,
                "image_cont": image_cont, "image_chunks": chunks}

    def _greedy(self, ids, inputs: dict) -> np.ndarray:
        out = self.model.generate(input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=CONTINUATION,
                                  min_new_tokens=CONTINUATION, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id or 0, **inputs)
        return out[0, ids.shape[1]:].numpy()


def _probe_gguf(ref: Reference, ref_out: dict, text: str, mmproj: str | None, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        req = {"model": text, "mmproj": mmproj, "text_prompt": ref.text_prompt, "image_prompt": ref.image_prompt,
               "text_continuation": ref_out["text_cont"].tolist(), "image_continuation": ref_out["image_cont"].tolist(),
               "image": str(Path(tmp) / "image.png"), "threads": threads, "eos": ref.tok.eos_token_id}
        ref.image.save(req["image"])
        (Path(tmp) / "req.json").write_text(json.dumps(req))
        proc = subprocess.run([sys.executable, "-m", "llavao1_export.llama_probe", str(Path(tmp) / "req.json"),
                               str(Path(tmp) / "out.npz")], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"llama.cpp failed on {text} (exit {proc.returncode}): {last}")
        with np.load(Path(tmp) / "out.npz") as z:
            return {k: z[k] for k in z.files}


def _is_quantized(path: str) -> bool:
    """Anything but F32: thresholds judge F32 files only."""
    return type_of_file(path) != "F32"


def verify(model_dir: str | Path, gguf: str | None = None, mmproj: str | None = None, onnx_dir: str | None = None,
           threads: int = 0) -> VerifyReport:
    if not (gguf or onnx_dir):
        raise ExportError("nothing to verify: give --gguf (with --mmproj) and/or --onnx")
    ref = Reference(model_dir)
    if onnx_dir and ref.ckpt.family.name != "llava":
        raise ExportError(f"--onnx: the ONNX export covers the LLaVA family only; {model_dir} is "
                          f"{ref.ckpt.family.name} (verify its GGUF files instead)")
    ref_out = ref.run()
    paths: list[PathReport] = []
    if gguf:
        paths.append(_compare_gguf(ref, ref_out, gguf, mmproj, threads))
    if onnx_dir:
        paths.append(_compare_onnx(ref, ref_out, onnx_dir))
    return VerifyReport(str(model_dir), paths)


def _compare_gguf(ref: Reference, ref_out: dict, gguf: str, mmproj: str | None, threads: int) -> PathReport:
    got = _probe_gguf(ref, ref_out, gguf, mmproj, threads)
    quantized = _is_quantized(gguf) or (mmproj is not None and _is_quantized(mmproj))
    rep = PathReport("gguf", [gguf] + ([mmproj] if mmproj else []), quantized)
    hf_ids = ref.text_ids()
    if list(got["text_ids"]) != hf_ids:
        rep.tokens_match = False
        rep.notes.append(f"tokenization differs: llama.cpp {list(got['text_ids'])[:12]}... vs transformers {hf_ids[:12]}...")
    else:
        rep.text_max_abs_logit = float(np.abs(got["text_logits"] - ref_out["text_logits"]).max())
    if not bool(got["eos_is_eog"]):
        rep.tokens_match = False
        rep.notes.append(f"transformers' EOS {ref.tok.eos_token!r} does not end generation in llama.cpp")
    n = len(ref_out["text_cont"])
    rep.text_top1_agreement = float((got["text_argmax"][:n] == ref_out["text_cont"]).mean())
    if mmproj:
        _compare_image(ref, ref_out, got, rep)
    if ref.ckpt.family.text_arch == "qwen2vl" and float(ref.ckpt.text_config.get("rms_norm_eps", 0)) > 1e-9:
        rep.notes.append(f"llama.cpp's qwen2vl reads no RMS-norm epsilon (it uses 0); this checkpoint's is "
                         f"{ref.ckpt.text_config['rms_norm_eps']:g}, part of the text gap")
    if not _is_quantized(gguf) and rep.text_max_abs_logit is not None:
        rep.checks["text_logits<=1e-4"] = rep.text_max_abs_logit <= TEXT_THRESHOLD
    if mmproj and not _is_quantized(mmproj) and not _has_cls(ref) and rep.image_rel_embd is not None:
        rep.checks["image_embd<=5e-3"] = rep.image_rel_embd <= IMAGE_THRESHOLD
    return rep


def _has_cls(ref: Reference) -> bool:
    return ref.model.config.vision_config.model_type == "clip_vision_model"


def _compare_image(ref: Reference, ref_out: dict, got: dict, rep: PathReport) -> None:
    """Image prompts: the same text tokens around the image, the same chunks (tiles) of the same sizes, then
    each chunk's embeddings and the first answer token's logits."""
    hf_ids = ref.image_ids()
    hf_text = [t for t in hf_ids if t != ref.vision.image_token_id]
    chunks = ref_out["image_chunks"]
    sizes = [len(c) for c in chunks]
    if list(got["image_ids"]) != hf_text or list(got["image_chunk_tokens"]) != sizes:
        rep.tokens_match = False
        rep.notes.append(f"image prompt differs: llama.cpp chunks {list(got['image_chunk_tokens'])} vs transformers "
                         f"{sizes}; text tokens equal: {list(got['image_ids']) == hf_text}")
        return
    rep.compare_image_embeddings(got["image_embd"], np.concatenate(chunks))
    rep.image_max_abs_logit = float(np.abs(got["image_last_logits"] - ref_out["image_last_logits"]).max())
    m = len(ref_out["image_cont"])
    rep.image_top1_agreement = float((got["image_argmax"][:m] == ref_out["image_cont"]).mean())
    if len(chunks) > 1:
        rep.notes.append(f"image in {len(chunks)} chunks of {sizes[0]} tokens, compared chunk by chunk")
    if _has_cls(ref):
        rep.notes.append("CLIP tower with CLS: llama.cpp 0.3.36 orders CLS after the patches (issue #25814, fixed by "
                         "PR #25844); the image gap is reported, not judged")


def _compare_onnx(ref: Reference, ref_out: dict, onnx_dir: str) -> PathReport:
    from .onnx_export import GRAPHS, OnnxLlava

    runner = OnnxLlava(onnx_dir)
    quantized = runner.meta["quant"] != "none"
    rep = PathReport("onnx", [str(Path(onnx_dir) / g) for g in GRAPHS], quantized)
    text_ids = ref.text_ids()
    logits, _ = runner.forward(runner.embed_prompt(text_ids, None), None, 0)
    rep.text_max_abs_logit = float(np.abs(logits[0] - ref_out["text_logits"]).max())
    cont = runner.generate(text_ids, None, len(ref_out["text_cont"]), eos_token_id=-1)
    rep.text_top1_agreement = float(np.mean(np.array(cont) == ref_out["text_cont"]))
    px = ref.vision.arrays(ref.image)["pixel_values"][0]
    rep.compare_image_embeddings(runner.image_features(px), ref_out["image_chunks"][0])
    image_ids = ref.image_ids()
    ilogits, _ = runner.forward(runner.embed_prompt(image_ids, px), None, 0)
    rep.image_max_abs_logit = float(np.abs(ilogits[0, -1] - ref_out["image_last_logits"]).max())
    icont = runner.generate(image_ids, px, len(ref_out["image_cont"]), eos_token_id=-1)
    rep.image_top1_agreement = float(np.mean(np.array(icont) == ref_out["image_cont"]))
    if not quantized:
        rep.checks["onnx_logits<=1e-4"] = max(rep.text_max_abs_logit, rep.image_max_abs_logit) <= ONNX_THRESHOLD
    return rep
