"""Ways to answer a BenchItem: GGUF through the runtime (any search), ONNX or transformers (greedy)."""

from __future__ import annotations

import time
from pathlib import Path

from llavao1_edge.images import load_image, preprocess
from llavao1_edge.options import EngineConfig, SearchConfig
from llavao1_edge.prompting import render_user_turn
from llavao1_models.llava import image_prompt_ids, image_token_count

from .accuracy import Answer
from .common import BenchItem


class GGUFBackend:
    name = "gguf"

    def __init__(self, model: str, mmproj: str, config: EngineConfig | None = None):
        from llavao1_edge.api import Reasoner

        self.model, self.mmproj = model, mmproj
        self.reasoner = Reasoner(model, mmproj, config or EngineConfig(n_seq_max=17))

    def answer(self, item: BenchItem, cfg: SearchConfig) -> Answer:
        t0 = time.perf_counter()
        res = self.reasoner.ask(item.image, item.question, cfg)
        made = [j for s in res.steps for j in s.judgements]
        picks = {"first": sum(j.winner == j.first for j in made), "second": sum(j.winner == j.second for j in made)}
        checked = [c.check for s in res.steps for c in s.candidates if s.unit == "reasoning"]
        checks = {"correct": checked.count(True), "incorrect": checked.count(False)}  # None: not checked
        captions = [{"candidates": [c.unit_text for c in s.candidates], "chosen": s.chosen,
                     "judgements": [(j.first, j.second, j.winner) for j in s.judgements]}
                    for s in res.steps if s.unit == "caption"]  # scored against the scene in run_accuracy
        return Answer(res.text, time.perf_counter() - t0, {**res.timings, "tokens": res.tokens, "flags": res.flags,
                                                           "judge_picks": picks, "reasoning_checks": checks,
                                                           "caption_steps": captions})

    def close(self) -> None:
        self.reasoner.close()


def _image_bytes(item: BenchItem):
    return load_image(item.image)


class OnnxBackend:
    """Greedy decoding over onnxruntime sessions (export's numpy loop)."""

    name = "onnx"

    def __init__(self, folder: str | Path, threads: int = 0, max_new_tokens: int = 512):
        from transformers import AutoTokenizer

        from llavao1_export.onnx_export import OnnxLlava

        self.runner = OnnxLlava(folder, threads)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.meta, self.max_new = self.runner.meta, max_new_tokens

    def answer(self, item: BenchItem, cfg: SearchConfig | None = None) -> Answer:
        t0 = time.perf_counter()
        ids = image_prompt_ids(self.tok, render_user_turn(self.tok.chat_template, f"<image>\n{item.question}"),
                               self.meta["image_token_id"], self.meta["n_image_tokens"])
        px = preprocess(_image_bytes(item), self.meta["image_size"], self.meta["image_mean"], self.meta["image_std"])
        out = self.runner.generate(ids, px, self.max_new)
        text = self.tok.decode(out, skip_special_tokens=False).split(self.tok.eos_token)[0]
        return Answer(text, time.perf_counter() - t0)

    def close(self) -> None:
        pass


class HFBackend:
    """The transformers model in fp32, greedy: the unquantized reference row."""

    name = "transformers"

    def __init__(self, folder: str | Path, threads: int = 0, max_new_tokens: int = 512):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from llavao1_models.checkpoint import read_image_stats

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.mean, self.std = read_image_stats(folder) or ((0.5,) * 3, (0.5,) * 3)
        self.max_new = max_new_tokens

    def answer(self, item: BenchItem, cfg: SearchConfig | None = None) -> Answer:
        torch, config = self.torch, self.model.config
        t0 = time.perf_counter()
        ids = image_prompt_ids(self.tok, render_user_turn(self.tok.chat_template, f"<image>\n{item.question}"),
                               config.image_token_id, image_token_count(config))
        px = torch.from_numpy(preprocess(_image_bytes(item), config.vision_config.image_size, self.mean, self.std))[None]
        with torch.no_grad():
            out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      pixel_values=px, max_new_tokens=self.max_new, do_sample=False,
                                      eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id or 0)
        text = self.tok.decode(out[0, len(ids):], skip_special_tokens=False).split(self.tok.eos_token)[0]
        return Answer(text, time.perf_counter() - t0)

    def close(self) -> None:
        pass
