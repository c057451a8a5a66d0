"""The LLaVA-CoT fine-tuning loop: LoRA or full, one device or several (torchrun, DDP).

Determinism is by construction: the data order of every epoch comes from the seed, a
checkpoint stores model, optimizer, scheduler, RNG states and the data position, and
`--resume` continues exactly where the checkpoint stopped (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llavao1_edge.answers import is_correct
from llavao1_edge.images import ImageError
from llavao1_edge.stages import parse_answer
from llavao1_models.checkpoint import CheckpointError, looks_like_hub_id, read_image_processor
from llavao1_models.family import Family, family_for
from llavao1_models.llava import FAMILY as LLAVA
from llavao1_models.llava import build_model, save_checkpoint

from .batching import epoch_order, length_split
from .checkpoints import latest_checkpoint, load_training_state, save_training_state
from .data import (
    BadExample,
    Conversations,
    Example,
    collate,
    image_arrays,
    read_records_tolerant,
    tokenize_record,
)
from .specs import get_spec
from .tokenizer import STAGE_TOKENS, train_tokenizer
from .vision_pretrain import VisionPretrainConfig, pretrain_vision

PRECISIONS = ("auto", "fp32", "bf16")  # see _autocast


@dataclass
class TrainConfig:
    data: str = ""  # folder with records.jsonl (or the .jsonl file itself)
    out: str = ""
    init: str | None = None  # a named from-scratch config, e.g. "shapes-tiny"
    model: str | None = None  # or a local Hugging Face checkpoint folder of a supported family
    lora: bool = True  # LoRA on the language model; from-scratch trains all
    full: bool = False  # full fine-tuning (the paper's choice)
    freeze_vision: bool = False  # keep the tower fixed (--full, or --init after --pretrain-vision-steps)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_vision: bool = False  # LoRA on the vision tower's blocks too
    train_projector: bool | None = None  # with LoRA, train the projector fully (None: the family's default)
    min_pixels: int | None = None  # dynamic-resolution towers (Qwen2-VL): image size limits (None: llama.cpp's)
    max_pixels: int | None = None
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 1e-5  # the paper's; from-scratch models want ~1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_size: int = 4  # per device
    group_by_length: bool = False  # batches of similar length (less padding); see epoch_order
    grad_accum: int = 1
    length_split: int = 1  # run each micro-batch as up to N forward passes of similar length; see length_split
    max_length: int = 2048  # tokens per example, image tokens included
    save_every: int = 0  # steps; 0: only the final model
    keep_checkpoints: int = 2
    resume: bool = False
    eval_data: str | None = None
    eval_every: int = 0
    eval_limit: int = 64
    log_every: int = 10
    device: str = "auto"  # auto | cuda | mps | cpu
    grad_checkpointing: bool | None = None  # None: on for CUDA
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16 (autocast; fp32 weights)
    seed: int = 0
    skip_bad: bool = False
    vision_pretrain_steps: int = 0  # --init only: dense-pretrain the tower on the records' scene graphs first
    tokenizer_vocab: int | None = None  # --init only: BPE vocabulary size (default from the config)
    progress: bool | None = None  # None: a bar on terminals


class TrainError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Setup


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA GPU is visible")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise TrainError("--device mps: MPS is not available")
    if name not in ("cpu", "mps"):
        raise TrainError(f"--device must be auto, cuda, mps or cpu, got {name!r}")
    return torch.device(name)


def _records_path(data: str) -> Path:
    p = Path(data)
    p = p / "records.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise TrainError(f"{p}: no records file (expected DIR/records.jsonl from llavao1-data, or a .jsonl file)")
    return p


@dataclass
class Loaded:
    model: object
    tokenizer: object
    family: Family
    vision: object  # the family's VisionInputs for this model
    spec: object  # the from-scratch ModelSpec, or None for a checkpoint
    added_tokens: list[int]  # ids of stage tags added to a checkpoint's vocabulary


def load_or_build(cfg: TrainConfig, texts_for_tokenizer, out: Path) -> Loaded:
    """The model to train, its tokenizer and its family. Never downloads."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    limits = _pixel_limits(cfg)
    if cfg.init:
        spec = get_spec(cfg.init)
        tok_dir = out / "tokenizer"
        if tok_dir.is_dir():  # resume: the tokenizer trained by the first run
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tokenizer = train_tokenizer(texts_for_tokenizer(), cfg.tokenizer_vocab or spec.vocab_size)
            tokenizer.save_pretrained(tok_dir)
        model = build_model(spec, tokenizer, seed=cfg.seed)
        processor = {"image_mean": list(spec.image_mean), "image_std": list(spec.image_std)}
        vision = LLAVA.inputs(model.config.to_dict(), processor, tokenizer, limits)
        return Loaded(model, tokenizer, LLAVA, vision, spec, [])
    src = Path(cfg.model)
    if not src.is_dir():
        if looks_like_hub_id(cfg.model):
            raise TrainError(f"{cfg.model}: looks like a hub id; the weights must be on disk (download them first)")
        raise TrainError(f"{src}: no such checkpoint folder")
    if not list(src.glob("*.safetensors")):
        raise TrainError(f"{src}: no .safetensors weights (pickle weights are not loaded)")
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        family = family_for(config, src / "config.json")
        processor = read_image_processor(src)
    except (OSError, json.JSONDecodeError, CheckpointError) as e:
        raise TrainError(str(e) if isinstance(e, CheckpointError) else f"{src / 'config.json'}: {e}") from None
    if family.inputs is None:
        raise TrainError(f"{src}: training does not support the {family.name} family yet")
    if not processor:
        raise TrainError(f"{src}: no processor config with image_mean/image_std")
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    added = add_stage_tokens(model, tokenizer)
    vision = family.inputs(model.config.to_dict(), processor, tokenizer, limits)
    return Loaded(model, tokenizer, family, vision, None, added)


def _pixel_limits(cfg: TrainConfig) -> tuple[int | None, int | None] | None:
    """(min, max) pixels; None where llama.cpp's default for the family holds."""
    if cfg.min_pixels is None and cfg.max_pixels is None:
        return None
    if cfg.min_pixels is not None and cfg.max_pixels is not None and cfg.min_pixels > cfg.max_pixels:
        raise TrainError(f"--min-pixels {cfg.min_pixels} is above --max-pixels {cfg.max_pixels}")
    return cfg.min_pixels, cfg.max_pixels


def add_stage_tokens(model, tokenizer) -> list[int]:
    """The stage tags as tokens of their own where the vocabulary lacks them (a stage then opens and closes in
    one token, and the runtime stops a stage on one id); the embeddings grow to match. Returns the new ids."""
    from tokenizers import AddedToken

    missing = [t for t in STAGE_TOKENS if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if not missing:
        return []
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(missing)


def _apply_training_mode(loaded: Loaded, cfg: TrainConfig):
    model, family = loaded.model, loaded.family
    family.freeze_unused(model)
    if cfg.init or cfg.full or not cfg.lora:  # every weight trains, the tower too unless frozen
        if cfg.freeze_vision:
            for p in getattr(model.model, family.vision_module).parameters():
                p.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    targets = family.lora_text + (f"|{family.lora_vision}" if cfg.lora_vision else "")
    train_projector = family.train_projector if cfg.train_projector is None else cfg.train_projector
    new_tokens = {}
    if loaded.added_tokens:  # new stage tags: only their rows of the embeddings (and of an untied output) train
        new_tokens = {"embed_tokens": loaded.added_tokens}
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            new_tokens["lm_head"] = loaded.added_tokens
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                      modules_to_save=[family.projector_module] if train_projector else None,
                      trainable_token_indices=new_tokens or None)
    return get_peft_model(model, lcfg)


def _schedule(total: int, warmup_ratio: float):
    warm = max(1, int(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[tuple[Example, str]], vision, device, max_new: int = 512) -> float:
    """Exact-match accuracy of the CONCLUSION with greedy decoding."""
    inner = model.module if hasattr(model, "module") else model
    was_training = inner.training
    inner.eval()
    correct = 0
    for ex, reference in examples:
        prompt_len = next(i for i, label in enumerate(ex.labels) if label != -100)
        ids = torch.tensor([ex.input_ids[:prompt_len]], device=device)
        kwargs = {}
        if ex.image is not None:
            kwargs = {k: v.to(device) for k, v in _image_inputs(vision, [image_arrays(ex, vision)], ids).items()}
        out = inner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             **kwargs)
        text = tokenizer.decode(out[0, prompt_len:], skip_special_tokens=False).split(tokenizer.eos_token)[0]
        parsed = parse_answer(text)
        correct += is_correct(parsed.conclusion if parsed.segments else text, reference)
    inner.train(was_training)
    return correct / max(1, len(examples))


# ---------------------------------------------------------------------------------------------
# The loop


def _log(out: Path, obj: dict) -> None:
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")


@dataclass
class Run:
    """What setup prepares for a whole run: fixed from the first step to the last."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    tokenizer: object
    family: Family
    vision: object  # the family's VisionInputs: how an image becomes model inputs
    spec: object  # the from-scratch ModelSpec, or None for a checkpoint
    examples: list[Example]
    eval_examples: list[tuple[Example, str]]
    skipped: list[str]
    params: list  # the trainable parameters
    per_step: int  # examples per optimizer step, all ranks together
    total: int  # optimizer steps
    autocast: torch.autocast


@dataclass
class TrainState:
    """What each step changes, and what a checkpoint restores."""

    model: object  # the model being trained (DDP-wrapped on several ranks)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    epoch: int = 0
    offset: int = 0  # examples of the epoch's order already used

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def train(cfg: TrainConfig) -> Path:
    """Run training; returns OUT/final."""
    run, state = setup(cfg)
    train_loop(run, state)
    return finish(run, state)


def _check_config(cfg: TrainConfig) -> None:
    if bool(cfg.init) == bool(cfg.model):
        raise TrainError("give exactly one of --init NAME or --model HF_DIR")
    if cfg.vision_pretrain_steps and not cfg.init:
        raise TrainError("--pretrain-vision-steps applies to from-scratch models (--init) only")
    if cfg.freeze_vision and cfg.init and not cfg.vision_pretrain_steps:
        raise TrainError("--freeze-vision with --init needs --pretrain-vision-steps N (a random tower would stay random)")
    if (cfg.lora_vision or cfg.train_projector is not None) and (cfg.full or not cfg.lora or cfg.init):
        raise TrainError("--lora-vision and --train-projector apply to LoRA on a checkpoint (--model DIR --lora)")
    if cfg.length_split < 1:
        raise TrainError(f"--length-split must be 1 or more, got {cfg.length_split}")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"precision {cfg.precision!r}: choose {', '.join(PRECISIONS)}")


def setup(cfg: TrainConfig) -> tuple[Run, TrainState]:
    """Data, model, optimizer and schedule, in an order that makes every run from the same config and
    seed identical (and a resumed one continue exactly)."""
    _check_config(cfg)
    rank, world, local_rank = _dist()
    device = pick_device(cfg.device, local_rank)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and latest_checkpoint(out) is not None:
            raise TrainError(f"{out}: holds checkpoints from an earlier run; pass --resume or choose a new --out")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    skipped: list[str] = []
    records = read_records_tolerant(_records_path(cfg.data), cfg.skip_bad, skipped)

    def texts():
        return (t.value for r in records for t in r.conversations)

    if world > 1 and cfg.init and not (out / "tokenizer").is_dir():
        if rank == 0:  # one rank trains the tokenizer, the others wait and load it
            load_or_build(cfg, texts, out)
        torch.distributed.barrier()
    loaded = load_or_build(cfg, texts, out)
    tokenizer, vision = loaded.tokenizer, loaded.vision
    conversations = Conversations(tokenizer, Path(cfg.model or cfg.init).name)
    root = _records_path(cfg.data).parent

    def build(recs, label: str) -> list[Example]:
        exs = []
        for r in recs:
            try:
                exs.append(tokenize_record(tokenizer, conversations, vision, r, cfg.max_length, root))
            except BadExample as e:
                if not cfg.skip_bad:
                    raise TrainError(f"{label}: {e}") from None
                skipped.append(str(e))
        return exs

    examples = build(records, str(_records_path(cfg.data)))
    if not examples:
        raise TrainError("no usable training examples")
    eval_examples: list[tuple[Example, str]] = []
    if cfg.eval_data:
        erecs = read_records_tolerant(_records_path(cfg.eval_data), cfg.skip_bad, skipped)[: cfg.eval_limit]
        for r, ex in zip(erecs, build(erecs, cfg.eval_data), strict=False):
            ref = r.meta.get("answer") or parse_answer(r.answer).conclusion or r.answer
            eval_examples.append((ex, ref))
    resuming = cfg.resume and latest_checkpoint(out) is not None
    if cfg.vision_pretrain_steps and (cfg.freeze_vision or not resuming):  # a frozen tower is in no checkpoint
        _pretrain_tower(cfg, loaded.model, loaded.spec, records, root, vision, device, out, rank, world)
    model = _apply_training_mode(loaded, cfg).to(device)
    if cfg.grad_checkpointing or (cfg.grad_checkpointing is None and device.type == "cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        text_only = any(e.image is None for e in examples)  # such batches leave the vision tower unused
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                    find_unused_parameters=text_only)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = max(1, len(examples) // per_step)
    total = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, cfg.warmup_ratio))
    state = TrainState(model, optimizer, scheduler)
    if cfg.resume:
        ck = latest_checkpoint(out)
        if ck is None:
            raise TrainError(f"--resume: no checkpoint in {out / 'checkpoints'}")
        try:
            restored = load_training_state(ck, model, optimizer, scheduler)
        except ValueError as e:
            raise TrainError(str(e)) from None
        state.step, state.epoch, state.offset = restored["step"], restored["position"]["epoch"], restored["position"]["offset"]
    if rank == 0:
        (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "world_size": world,
                                                           "examples": len(examples), "total_steps": total}, indent=2))
    run = Run(cfg, out, rank, world, device, tokenizer, loaded.family, vision, loaded.spec, examples, eval_examples,
              skipped, params, per_step, total, _autocast(cfg.precision, device))
    return run, state


@dataclass
class StepStats:
    loss: float  # mean token loss of the step (this rank's share)
    tokens: int  # real tokens computed
    cells: int  # real + padding tokens computed
    samples: int
    last_micro: list[Example]  # the last whole micro-batch, for the logged image check


def train_step(run: Run, state: TrainState, mine: list[int]) -> StepStats:
    """One optimizer step on this rank's share of a global batch (indices into run.examples)."""
    cfg, model = run.cfg, state.model
    state.optimizer.zero_grad(set_to_none=True)
    n_label = sum(sum(1 for x in run.examples[i].labels[1:] if x != -100) for i in mine)
    passes, micro = [], []  # forward passes of this step: micro-batches, each cut into runs of similar length
    for k in range(cfg.grad_accum):
        micro = [run.examples[i] for i in mine[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
        passes += [[micro[i] for i in part]
                   for part in length_split([len(e.input_ids) for e in micro], cfg.length_split) if part]
    loss_sum, tokens, cells = 0.0, 0, 0
    for k, part in enumerate(passes):
        batch = _device_batch(run, part)
        sync = run.world == 1 or k == len(passes) - 1
        ctx = model.no_sync() if not sync else contextlib.nullcontext()
        with ctx, run.autocast:
            logits = model(**{k2: v for k2, v in batch.items() if k2 != "labels"}).logits
            part_sum = _token_loss_sum(logits, batch["labels"])
            loss = part_sum / max(1, n_label)
        loss.backward()
        loss_sum += part_sum.item()
        tokens += int(batch["attention_mask"].sum())
        cells += batch["attention_mask"].numel()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    return StepStats(loss_sum / max(1, n_label), tokens, cells, sum(len(p) for p in passes), micro)


def next_batch(run: Run, state: TrainState, order: list[int]) -> tuple[list[int], list[int]]:
    """The next global batch and the epoch order it comes from (a new epoch's when this one is used up)."""
    if state.offset + run.per_step > len(order):
        state.epoch, state.offset = state.epoch + 1, 0
        order = epoch_order([len(e.input_ids) for e in run.examples], run.per_step, run.cfg.seed, state.epoch,
                            run.cfg.group_by_length)
    batch = order[state.offset:state.offset + run.per_step]
    state.offset += run.per_step
    return batch, order


def train_loop(run: Run, state: TrainState) -> None:
    """Steps until run.total: logging, evaluation and checkpoints on their schedules (rank 0)."""
    cfg, out = run.cfg, run.out
    bar = None
    if run.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=run.total, initial=state.step, desc="train", unit="step",
                   disable=None if cfg.progress is None else not cfg.progress, file=sys.stderr)
    t_last, tok_count, cell_count, sample_count = time.perf_counter(), 0, 0, 0
    order = epoch_order([len(e.input_ids) for e in run.examples], run.per_step, cfg.seed, state.epoch,
                        cfg.group_by_length)
    while state.step < run.total:
        batch, order = next_batch(run, state, order)
        stats = train_step(run, state, batch[run.rank::run.world])  # this rank's share of the global batch
        tok_count, cell_count, sample_count = tok_count + stats.tokens, cell_count + stats.cells, sample_count + stats.samples
        step = state.step
        if run.rank == 0:
            lr = state.scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", lr=f"{lr:.2e}",
                            tok_s=f"{tok_count * run.world / max(1e-9, time.perf_counter() - t_last):.0f}")
            if step % cfg.log_every == 0 or step == run.total or step == 1:
                dt = time.perf_counter() - t_last
                last = _device_batch(run, stats.last_micro)
                _log(out, {"step": step, "epoch": state.epoch, "loss": stats.loss, "lr": lr,
                           "tokens_per_s": tok_count * run.world / dt, "samples_per_s": sample_count * run.world / dt,
                           "padding": 1 - tok_count / max(1, cell_count),  # share of computed tokens that pad
                           **image_reliance(run, state.model, stats.last_micro, last)})
                t_last, tok_count, cell_count, sample_count = time.perf_counter(), 0, 0, 0
        if cfg.eval_every and run.eval_examples and step % cfg.eval_every == 0 and run.rank == 0:
            acc = evaluate(state.model, run.tokenizer, run.eval_examples, run.vision, run.device)
            _log(out, {"step": step, "eval_accuracy": acc, "eval_n": len(run.eval_examples)})
            bar.write(f"step {step}: eval accuracy {acc:.3f} on {len(run.eval_examples)}")
        if cfg.save_every and step % cfg.save_every == 0:
            if run.rank == 0:
                save_training_state(out, step, state.model, state.optimizer, state.scheduler, state.position,
                                    cfg.keep_checkpoints)
            if run.world > 1:
                torch.distributed.barrier()
    if bar is not None:
        bar.close()


def finish(run: Run, state: TrainState) -> Path:
    """OUT/final (rank 0), the replicas' checksums in the log (several ranks), the process group closed."""
    out = run.out
    if run.world > 1:  # replicas must hold identical weights; say so in the log if they do not
        sums = [None] * run.world
        torch.distributed.all_gather_object(sums, param_checksum(state.model))
        if run.rank == 0:
            _log(out, {"step": state.step, "replica_checksums": sums, "replicas_identical": len(set(sums)) == 1})
            if len(set(sums)) != 1:
                print("warning: data-parallel replicas diverged (checksums differ)", file=sys.stderr)
    if run.rank == 0:
        _save_final(state.model, run.tokenizer, run.spec, run.cfg, out)
        if run.skipped:
            print(f"skipped {len(run.skipped)} bad records (--skip-bad); first: {run.skipped[0]}", file=sys.stderr)
            _log(out, {"skipped": len(run.skipped), "first": run.skipped[:5]})
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out / "final"


def _pretrain_tower(cfg: TrainConfig, model, spec, records, root: Path, vision, device, out: Path,
                    rank: int, world: int) -> None:
    """Dense-pretrain the vision tower once into OUT/vision_pretrain.safetensors (rank 0); a
    restarted run and the other ranks load that file instead."""
    from safetensors.torch import load_file, save_file

    path = out / "vision_pretrain.safetensors"
    tower = model.model.vision_tower.to(device)
    trained_here = rank == 0 and not path.is_file()
    if trained_here:
        vcfg = VisionPretrainConfig(steps=cfg.vision_pretrain_steps, log_every=cfg.log_every, seed=cfg.seed)
        try:  # forked RNG: training the tower here or loading it leaves the LLaVA stage the same
            with torch.random.fork_rng(devices=[]):
                pretrain_vision(tower, records, root, vision, spec.feature_layer, vcfg, device,
                                log=lambda obj: _log(out, obj), progress=cfg.progress)
        except ImageError as e:
            raise TrainError(f"vision pretraining: {e}") from None
        tmp = out / f".vision_pretrain.tmp-{os.getpid()}"
        save_file({k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not trained_here:
        tower.load_state_dict(load_file(str(path), device=str(device)))


def param_checksum(model) -> str:
    """sha256 over all parameters, in name order."""
    import hashlib

    inner = model.module if hasattr(model, "module") else model
    h = hashlib.sha256()
    for name, p in sorted(inner.named_parameters()):
        h.update(name.encode() + p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _image_inputs(vision, images: list[dict | None], ids: torch.Tensor) -> dict:
    """A batch's image arguments and per-token extras as tensors (empty for a batch without images)."""
    if not any(i is not None for i in images):
        return {}
    return {**{k: torch.from_numpy(v) for k, v in vision.batch(images).items()}, **vision.sequence_inputs(ids)}


def _device_batch(run: Run, examples: list[Example], images: list[dict | None] | None = None) -> dict:
    if images is None:
        images = [image_arrays(e, run.vision) for e in examples]
    batch = collate(examples, images, run.tokenizer.pad_token_id, run.vision)
    return {k: v.to(run.device) for k, v in batch.items()}


@torch.no_grad()
def image_reliance(run: Run, model, examples: list[Example], batch: dict) -> dict:
    """Loss on a batch with its own images and with the images passed on one place: a model that ignores
    the image (its vision path collapsed) shows no gap. Empty unless the batch holds two or more images
    of one shape (then each example's image tokens still fit the other image)."""
    images = [image_arrays(e, run.vision) for e in examples]
    held = [i for i, a in enumerate(images) if a is not None]
    shapes = {tuple((k, v.shape) for k, v in images[i].items()) for i in held}
    if len(held) < 2 or len(shapes) != 1:
        return {}
    moved = list(images)
    for src, dst in zip(held, held[1:] + held[:1], strict=True):
        moved[dst] = images[src]
    inner = model.module if hasattr(model, "module") else model
    was_training = inner.training
    inner.eval()
    n = max(1, int((batch["labels"][:, 1:] != -100).sum()))
    losses = []
    for b in (batch, _device_batch(run, examples, moved)):
        with run.autocast:
            logits = inner(**{k: v for k, v in b.items() if k != "labels"}).logits
        losses.append(_token_loss_sum(logits, b["labels"]).item() / n)
    inner.train(was_training)
    return {"batch_loss": losses[0], "batch_loss_other_images": losses[1]}


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over answer tokens (labels != -100)."""
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100, reduction="sum")


def _autocast(precision: str, device) -> torch.autocast:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32. bf16 on a CPU needs bf16
    matrix units (AMX, avx512_bf16) to pay, and even there a long shapes-tiny run was slower than fp32 (README)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu")  # mps: fp32


def _save_final(model, tokenizer, spec, cfg: TrainConfig, out: Path) -> None:
    """OUT/final: a plain HF checkpoint (LoRA merged; the adapter kept in OUT/adapter)."""
    inner = model.module if hasattr(model, "module") else model
    tmp = out / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(inner, "merge_and_unload"):  # peft
        inner.save_pretrained(out / "adapter")
        inner = inner.merge_and_unload()
    inner = inner.to("cpu").float()
    if spec is not None:
        save_checkpoint(inner, tokenizer, spec, tmp)
    else:
        inner.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        src = Path(cfg.model)
        for name in ("preprocessor_config.json", "processor_config.json", "chat_template.jinja",
                     "chat_template.json", "llavao1_model.json"):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
