"""`llavao1-export`: convert a Hugging Face checkpoint (LLaVA, SmolVLM/Idefics3, Qwen2-VL/2.5-VL) to GGUF, quantize it,
and prove it still computes the same.

examples:
  llavao1-export gguf --model runs/tiny/final --out models/ --outtype f16
  llavao1-export quantize models/final-f16.gguf models/final-Q4_K_M.gguf --type Q4_K_M
  llavao1-export verify --model runs/tiny/final --gguf models/final-f32.gguf --mmproj models/mmproj-final-f32.gguf
  llavao1-export onnx --model runs/tiny/final --out models/onnx --quant int8
  llavao1-export inspect models/final-Q4_K_M.gguf
  llavao1-export import models/final-f16.gguf models/mmproj-final-f16.gguf --out runs/from-gguf
  llavao1-export crosscheck --model runs/qwen/final --llama-cpp llama.cpp/ --out runs/crosscheck
"""

from __future__ import annotations

import argparse
import json
import sys

from llavao1_edge.extras import require_extra, run_guarded


def build_parser() -> argparse.ArgumentParser:
    from llavao1_edge.formats import ONNX_QUANTS, OUTTYPES, QUANT_TYPES

    p = argparse.ArgumentParser(prog="llavao1-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gguf", help="write the text model and the projector (mmproj) as GGUF")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint folder (LLaVA, SmolVLM/Idefics3, "
                   "Qwen2-VL/2.5-VL)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--outtype", default="f16", choices=list(OUTTYPES))
    q = sub.add_parser("quantize", help="quantize a text-model or mmproj GGUF",
                       description=f"Types: {', '.join(QUANT_TYPES)}. The input is never overwritten.")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--type", required=True, help="quantization type, e.g. Q4_K_M")
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--json", action="store_true")
    o = sub.add_parser("onnx", help="write vision_encoder / embed_tokens / decoder_model_merged ONNX graphs")
    o.add_argument("--model", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--quant", default="none", choices=ONNX_QUANTS)
    v = sub.add_parser("verify", help="compare exported files with the transformers model",
                       description="Thresholds: F32 GGUF text logits <= 1e-4, image embeddings <= 5e-3 (towers "
                       "without CLS), ONNX fp32 logits <= 1e-4. Quantized files are reported, not judged. "
                       "Exit code 1 when a threshold fails.")
    v.add_argument("--model", required=True)
    v.add_argument("--gguf", help="text model GGUF")
    v.add_argument("--mmproj", help="projector GGUF")
    v.add_argument("--onnx", help="ONNX folder from `llavao1-export onnx`")
    v.add_argument("--threads", type=int, default=0)
    v.add_argument("--json", action="store_true")
    m = sub.add_parser("import", help="a GGUF pair written by `gguf` back into a checkpoint to fine-tune",
                       description="The inverse of `gguf`: F32 comes back exactly, F16/BF16 as the values the "
                       "file holds, quantized types dequantized (lossy). Then: llavao1-train --model OUT --full ...")
    m.add_argument("text", help="text model GGUF")
    m.add_argument("mmproj", help="its projector GGUF")
    m.add_argument("--out", required=True, help="new checkpoint folder (must not exist, or be empty)")
    c = sub.add_parser("crosscheck", help="our GGUF pair against llama.cpp's own converter's, on one checkpoint",
                       description="Write the checkpoint with our writer and with llama.cpp's convert_hf_to_gguf.py "
                       "(from --llama-cpp, a llama.cpp source folder with its converter requirements installed), "
                       "both F32; report keys and tensors that differ and whether llama.cpp computes the same logits "
                       "and image embeddings from both pairs. Exit code 1 when it does not.")
    c.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    c.add_argument("--llama-cpp", required=True, help="llama.cpp source folder (holds convert_hf_to_gguf.py)")
    c.add_argument("--out", required=True, help="folder for both pairs")
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--json", action="store_true")
    i = sub.add_parser("inspect", help="architecture, sizes, tensor types and metadata of a GGUF")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    return p


def _run(args) -> int:
    if args.command == "gguf":
        from .gguf_convert import convert_to_gguf

        res = convert_to_gguf(args.model, args.out, args.outtype, log=lambda s: print(s, file=sys.stderr))
        print(res.text)
        print(res.mmproj)
        return 0
    if args.command == "quantize":
        from .quantize import quantize_gguf

        res = quantize_gguf(args.input, args.output, args.type, args.threads)
        print(json.dumps({**vars(res), "path": str(res.path)}) if args.json else res.summary())
        return 0
    if args.command == "onnx":
        from .onnx_export import export_onnx

        print(export_onnx(args.model, args.out, args.quant, log=lambda s: print(s, file=sys.stderr)))
        return 0
    if args.command == "import":
        from .gguf_import import import_gguf

        res = import_gguf(args.text, args.mmproj, args.out, log=lambda s: print(s, file=sys.stderr))
        for note in res.notes:
            print(f"note: {note}", file=sys.stderr)
        print(res.path)
        return 0
    if args.command == "verify":
        from .verify import verify

        if args.mmproj and not args.gguf:
            raise ValueError("--mmproj needs --gguf (the text model it belongs to)")
        report = verify(args.model, args.gguf, args.mmproj, args.onnx, args.threads)
        print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
        return 0 if report.passed else 1
    if args.command == "crosscheck":
        from .crosscheck import crosscheck

        res = crosscheck(args.model, args.llama_cpp, args.out, args.threads, log=lambda s: print(s, file=sys.stderr))
        print(json.dumps(res.to_json(), indent=2, default=str) if args.json else res.table())
        return 0 if res.same_behaviour else 1
    from llavao1_edge.cli import main as edge_main

    return edge_main(["info", args.file] + (["--json"] if args.json else []))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "inspect":
        require_extra("llavao1-export", "export", ("torch", "transformers", "safetensors", "onnx", "onnxruntime"))
    from llavao1_edge.modelfile import ModelFileError
    from llavao1_models.checkpoint import CheckpointError

    from .errors import ExportError

    return run_guarded("llavao1-export", lambda: _run(args), (ExportError, CheckpointError, ModelFileError, ValueError, OSError),
                       "interrupted; nothing was left under the final name")


if __name__ == "__main__":
    sys.exit(main())
