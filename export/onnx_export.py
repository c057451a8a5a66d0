"""LLaVA -> ONNX in the three-graph layout of published ONNX LLaVA models, and a numpy runner.

  vision_encoder.onnx          pixel_values [B,3,S,S] -> image_features [B,N,D] (projected)
  embed_tokens.onnx            input_ids [B,T] -> inputs_embeds [B,T,D]
  decoder_model_merged.onnx    inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value
                               -> logits [B,T,V], present.{i}.key/value

No tool exports LLaVA end to end (optimum-onnx needs transformers < 4.58 and never supported
LLaVA), so small wrappers go through torch.onnx (TorchScript exporter, eager attention).
`OnnxLlava` runs the graphs with onnxruntime and numpy only: no torch at inference.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from llavao1_edge.formats import ONNX_QUANTS
from llavao1_models.llava import image_token_count

from .errors import ExportError

GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")
OPSET = 17


def _wrappers(model):
    import torch
    from transformers import DynamicCache

    cfg = model.config
    n_layers = cfg.text_config.num_hidden_layers
    layer = cfg.vision_feature_layer
    strategy = cfg.vision_feature_select_strategy

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.proj = model.model.vision_tower, model.model.multi_modal_projector

        def forward(self, pixel_values):
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[layer]
            if strategy == "default":
                hidden = hidden[:, 1:]  # drop CLS
            return self.proj(hidden)

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.model.language_model.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm, self.head = model.model.language_model, model.lm_head

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            present = []
            for i in range(n_layers):
                present += [out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values]
            return (self.head(out.last_hidden_state), *present)

    return Vision(), Embed(), Decoder()


def _kv_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return past, present


def export_onnx(model_dir: str | os.PathLike, out_dir: str | os.PathLike, quant: str = "none",
                log=lambda s: None) -> Path:
    """Write the three graphs (and config) to OUT; quantized with int8 or int4 if asked."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from llavao1_models.checkpoint import load_checkpoint

    if quant not in ONNX_QUANTS:
        raise ExportError(f"--quant must be one of {', '.join(ONNX_QUANTS)}, got {quant!r}")
    ckpt = load_checkpoint(model_dir, weights=False)  # clear errors for broken folders before torch loads anything
    if ckpt.family.name != "llava":
        raise ExportError(f"{model_dir}: the ONNX export covers the LLaVA family (LlavaForConditionalGeneration) only; "
                          f"this is {ckpt.family.name}: export it as GGUF")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    n_layers, kv_heads = tc.num_hidden_layers, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        vision, embed, decoder = _wrappers(model)
        past_names, present_names = _kv_names(n_layers)
        with torch.no_grad():
            log("exporting vision_encoder.onnx")
            px = torch.zeros(1, 3, vc.image_size, vc.image_size)
            torch.onnx.export(vision, (px,), tmp / GRAPHS[0], input_names=["pixel_values"],
                              output_names=["image_features"], dynamic_axes={"pixel_values": {0: "batch"},
                                                                             "image_features": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
            log("exporting embed_tokens.onnx")
            torch.onnx.export(embed, (torch.zeros(1, 4, dtype=torch.long),), tmp / GRAPHS[1], input_names=["input_ids"],
                              output_names=["inputs_embeds"], dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                                                            "inputs_embeds": {0: "batch", 1: "seq"}},
                              opset_version=OPSET, dynamo=False)
            log("exporting decoder_model_merged.onnx")
            P, T = 3, 4  # traced with a non-empty past; both axes are dynamic (an empty past works)
            args = (torch.zeros(1, T, tc.hidden_size), torch.ones(1, P + T, dtype=torch.long),
                    torch.arange(P, P + T)[None], *[torch.zeros(1, kv_heads, P, head_dim) for _ in past_names])
            dyn = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                   "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
            dyn.update({n: {0: "batch", 2: "past"} for n in past_names})
            dyn.update({n: {0: "batch", 2: "total"} for n in present_names})
            torch.onnx.export(decoder, args, tmp / GRAPHS[2],
                              input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
                              output_names=["logits", *present_names], dynamic_axes=dyn, opset_version=OPSET,
                              dynamo=False)
        if quant != "none":
            _quantize(tmp, quant, log)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        (tmp / "llavao1_onnx.json").write_text(json.dumps({
            "quant": quant, "n_layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "image_size": vc.image_size, "image_mean": ckpt.image_mean, "image_std": ckpt.image_std,
            "image_token_id": cfg.image_token_id, "n_image_tokens": image_token_count(cfg),
            "eos_token_id": tokenizer.eos_token_id, "source_sha256": ckpt.sha256,
        }, indent=2))
        tokenizer.save_pretrained(tmp)  # tokenizer.json for users; the runner itself takes token ids
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _quantize(folder: Path, quant: str, log) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs a generic pre-processing hint
    for name in GRAPHS:
        src = folder / name
        dst = folder / f"{name}.q"
        log(f"quantizing {name} to {quant}")
        if quant == "int8":
            # MatMul/Gemm only: ConvInteger (the patch embedding) may have no CPU kernel
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            qcfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=4)
            q = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=qcfg)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=False)
        os.replace(dst, src)


class OnnxLlava:
    """onnxruntime sessions over the three graphs; numpy in, numpy out."""

    def __init__(self, folder: str | os.PathLike, threads: int = 0):
        import onnxruntime as ort

        self.folder = Path(folder)
        meta_path = self.folder / "llavao1_onnx.json"
        missing = [g for g in (*GRAPHS, "llavao1_onnx.json") if not (self.folder / g).is_file()]
        if missing:
            raise ExportError(f"{self.folder}: missing {', '.join(missing)} (not an llavao1-export onnx folder)")
        self.meta = json.loads(meta_path.read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        prov = ["CPUExecutionProvider"]
        self.vision = ort.InferenceSession(str(self.folder / GRAPHS[0]), opts, providers=prov)
        self.embed = ort.InferenceSession(str(self.folder / GRAPHS[1]), opts, providers=prov)
        self.decoder = ort.InferenceSession(str(self.folder / GRAPHS[2]), opts, providers=prov)
        self.past_names, _ = _kv_names(self.meta["n_layers"])

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """[N, D] for one preprocessed image [3, S, S]."""
        return self.vision.run(None, {"pixel_values": pixels[None].astype(np.float32)})[0][0]

    def embed_prompt(self, ids: list[int], pixels: np.ndarray | None) -> np.ndarray:
        """[1, T, D]: token embeddings with the image features at the image tokens."""
        emb = self.embed.run(None, {"input_ids": np.array([ids], dtype=np.int64)})[0]
        if pixels is not None:
            where = np.flatnonzero(np.array(ids) == self.meta["image_token_id"])
            emb[0, where] = self.image_features(pixels)
        return emb

    def forward(self, embeds: np.ndarray, past: list[np.ndarray] | None, start: int):
        """(logits [1,T,V], present) for embeddings after `start` cached positions."""
        t = embeds.shape[1]
        if past is None:
            shape = (1, self.meta["kv_heads"], 0, self.meta["head_dim"])
            past = [np.zeros(shape, dtype=np.float32) for _ in self.past_names]
        feeds = {"inputs_embeds": embeds.astype(np.float32),
                 "attention_mask": np.ones((1, start + t), dtype=np.int64),
                 "position_ids": np.arange(start, start + t, dtype=np.int64)[None]}
        feeds.update(dict(zip(self.past_names, past, strict=True)))
        out = self.decoder.run(None, feeds)
        return out[0], out[1:]

    def generate(self, ids: list[int], pixels: np.ndarray | None = None, max_new_tokens: int = 64,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding with a KV cache, as transformers' generate(do_sample=False)."""
        eos = self.meta["eos_token_id"] if eos_token_id is None else eos_token_id
        logits, past = self.forward(self.embed_prompt(ids, pixels), None, 0)
        pos, out = len(ids), []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            if tok == eos:
                break
            emb = self.embed.run(None, {"input_ids": np.array([[tok]], dtype=np.int64)})[0]
            logits, past = self.forward(emb, past, pos)
            pos += 1
        return out
