"""`llavao1-train`: fine-tune a vision-language model on LLaVA-CoT records (LoRA or full).

Checkpoints of these families train (--model DIR): LLaVA (LlavaForConditionalGeneration), SmolVLM and
Idefics3, Qwen2-VL and Qwen2.5-VL. Images are prepared as llama.cpp prepares them for the family, prompts
rendered through the model's chat template as the runtime renders them; stage tags the vocabulary lacks
are added as tokens of their own.

examples:
  llavao1-train --data data/train --out runs/tiny --init shapes-tiny --lr 1e-3 --epochs 3
  llavao1-train --data cot100k --out runs/llava --model ./llava-1.5-7b-hf --lora --epochs 3
  llavao1-train --data cot100k --out runs/qwen --model ./Qwen2-VL-2B-Instruct --lora --lr 1e-4 --max-pixels 401408
  llavao1-train --data cot100k --out runs/full --model ./my-llava --full --lr 1e-5 --batch-size 4 --grad-accum 8
  torchrun --nproc_per_node 4 -m llavao1_train.cli --data ... --out ... --model ... --full

Paper recipe (LLaVA-CoT): --full --lr 1e-5 --epochs 3 and a global batch of 32
(batch-size x grad-accum x GPUs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from llavao1_edge.extras import require_extra, run_guarded


def build_parser() -> argparse.ArgumentParser:
    from .specs import MODEL_SPECS

    p = argparse.ArgumentParser(prog="llavao1-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder with records.jsonl (llavao1-data output) or a .jsonl file")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, log.jsonl, final/")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--init", choices=sorted(MODEL_SPECS), help="train a model from scratch from a named config")
    src.add_argument("--model", help="local Hugging Face checkpoint folder (never downloaded)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", action="store_true", help="LoRA on the language model (default)")
    mode.add_argument("--full", action="store_true", help="full fine-tuning (the paper's choice)")
    p.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed (with --full; or with --init after --pretrain-vision-steps)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-vision", action="store_true", help="LoRA on the vision tower's blocks too")
    p.add_argument("--train-projector", action=argparse.BooleanOptionalAction, default=None,
                   help="with LoRA, train the projector fully (default: yes for LLaVA, no for SmolVLM and Qwen)")
    p.add_argument("--min-pixels", type=int, help="Qwen2-VL: smallest image area in pixels (default: llama.cpp's, "
                   "8 x 28 x 28)")
    p.add_argument("--max-pixels", type=int, help="Qwen2-VL: largest image area in pixels, what bounds memory "
                   "(default: llama.cpp's, 4096 x 28 x 28; run with --image-max-tokens MAX/784 to match)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default %(default)s, the paper's)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4, help="examples per device per micro-step")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together: less padding, faster steps")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--length-split", type=int, default=1, metavar="N",
                   help="run each micro-batch as up to N forward passes of similar length: the same examples "
                        "and gradient, less padding (default %(default)s: one pass)")
    p.add_argument("--max-length", type=int, default=2048, help="token limit per example (image tokens included)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: final model only)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--eval-data", help="held-out records for --eval-every (exact match of CONCLUSION, greedy)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16 also speeds up CPUs with AMX/avx512_bf16")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations to save memory (default: on for CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true", help="skip bad records and report a count instead of stopping")
    p.add_argument("--tokenizer-vocab", type=int, help="--init: BPE vocabulary size")
    p.add_argument("--pretrain-vision-steps", type=int, default=0, metavar="N",
                   help="--init: first train the vision tower N steps to find the objects of the records' scene "
                        "graphs (meta.scene, from llavao1-data shapes), standing in for a pretrained encoder")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    require_extra("llavao1-train", "train", ("torch", "transformers", "peft", "safetensors", "tokenizers"))
    from .trainer import TrainConfig, TrainError, train

    args = build_parser().parse_args(argv)
    cfg = TrainConfig(
        data=args.data, out=args.out, init=args.init, model=args.model, lora=not args.full, full=args.full,
        freeze_vision=args.freeze_vision, lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
        lora_vision=args.lora_vision, train_projector=args.train_projector, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, batch_size=args.batch_size, group_by_length=args.group_by_length,
        grad_accum=args.grad_accum, length_split=args.length_split,
        max_length=args.max_length, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, eval_data=args.eval_data, eval_every=args.eval_every, eval_limit=args.eval_limit,
        log_every=args.log_every, device=args.device, grad_checkpointing=args.grad_checkpointing,
        precision=args.precision, seed=args.seed, skip_bad=args.skip_bad, tokenizer_vocab=args.tokenizer_vocab,
        vision_pretrain_steps=args.pretrain_vision_steps, progress=False if args.quiet else None)
    if args.print_config:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    from llavao1_data.records import RecordError

    def body() -> int:
        print(f"wrote {train(cfg)}")
        return 0

    return run_guarded("llavao1-train", body, (TrainError, RecordError, ValueError, OSError),
                       "interrupted (the last checkpoint is kept; continue with --resume)")


if __name__ == "__main__":
    sys.exit(main())
