"""Dense pretraining of a from-scratch vision tower on shapes scenes.

A real LLaVA starts from a pretrained SigLIP/CLIP tower; a from-scratch one must otherwise learn
to see through the language loss alone, which took shapes-tiny thousands of steps to start and
still left it miscounting. This is the stand-in for that pretraining: every patch of the feature
layer predicts the object whose centre lies inside it (none, or its colour), the object's shape
and size and where in the patch the centre is; a pooled head predicts how many objects there
are. The labels come from the scene graphs in the records' `meta.scene` (llavao1-data shapes).
The heads are thrown away; the tower is what the LLaVA stage starts from.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llavao1_data.shapes.scene import COLORS, MAX_OBJECTS, SHAPES, SIZES
from llavao1_edge.images import load_image

_COLORS, _SIZES = list(COLORS), list(SIZES)


@dataclass
class VisionPretrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 30  # steps
    holdout: int = 256  # images kept aside to report accuracy (at most a quarter of them)
    log_every: int = 50
    seed: int = 0


class DenseHeads(nn.Module):
    """Per patch: colour-or-none, shape, size, centre offset; pooled: object count."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.Linear(width, len(_COLORS) + 1 + len(SHAPES) + len(_SIZES) + 2)
        self.count = nn.Linear(width, MAX_OBJECTS)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:  # feats [B, P, W]
        out = self.patch(feats)  # [B, P, 7 + 3 + 2 + 2]
        color, shape, size, offset = out.split([len(_COLORS) + 1, len(SHAPES), len(_SIZES), 2], dim=-1)
        return {"color": color, "shape": shape, "size": size, "offset": offset.sigmoid(),
                "count": self.count(feats.mean(1))}


def scene_targets(scenes: list[list[dict]], grid: int) -> dict[str, torch.Tensor]:
    """Dense labels on a grid x grid patch raster (row-major, as the patch embedding flattens)."""
    b, p = len(scenes), grid * grid
    color = torch.zeros(b, p, dtype=torch.long)  # 0: no object centre in this patch
    shape = torch.full((b, p), -100, dtype=torch.long)
    size = torch.full((b, p), -100, dtype=torch.long)
    offset = torch.zeros(b, p, 2)
    count = torch.zeros(b, dtype=torch.long)
    for i, objs in enumerate(scenes):
        count[i] = len(objs) - 1
        for o in objs:
            gx, gy = o["x"] * grid, o["y"] * grid
            col, row = min(int(gx), grid - 1), min(int(gy), grid - 1)
            k = row * grid + col
            color[i, k] = _COLORS.index(o["color"]) + 1
            shape[i, k] = SHAPES.index(o["shape"])
            size[i, k] = _SIZES.index(o["size"])
            offset[i, k] = torch.tensor([gx - col, gy - row])
    return {"color": color, "shape": shape, "size": size, "offset": offset, "count": count}


def dense_loss(pred: dict, tgt: dict) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    has = tgt["color"] > 0  # [B, P]
    loss = ce(pred["color"].flatten(0, 1), tgt["color"].flatten())
    loss = loss + ce(pred["shape"].flatten(0, 1), tgt["shape"].flatten(), ignore_index=-100)
    loss = loss + ce(pred["size"].flatten(0, 1), tgt["size"].flatten(), ignore_index=-100)
    loss = loss + 5 * ((pred["offset"] - tgt["offset"]) ** 2)[has].mean()
    return loss + 0.5 * ce(pred["count"], tgt["count"])


@torch.no_grad()
def dense_accuracy(pred: dict, tgt: dict) -> dict[str, float]:
    """Scene-level exactness: every patch's colour-or-none right; shape and size on object patches."""
    has = tgt["color"] > 0
    patches_ok = (pred["color"].argmax(-1) == tgt["color"]).all(1)
    shape_ok = ((pred["shape"].argmax(-1) == tgt["shape"]) | ~has).all(1)
    size_ok = ((pred["size"].argmax(-1) == tgt["size"]) | ~has).all(1)
    return {"scene_colors": patches_ok.float().mean().item(),
            "scene_all": (patches_ok & shape_ok & size_ok).float().mean().item(),
            "count": (pred["count"].argmax(-1) == tgt["count"]).float().mean().item()}


def load_scenes(records, root: Path, vision) -> tuple[torch.Tensor, list[list[dict]]]:
    """(pixels [N, 3, S, S] float16, scenes) for every distinct image with a scene graph."""
    seen, pixels, scenes = set(), [], []
    for r in records:
        scene = r.meta.get("scene") if isinstance(r.meta, dict) else None
        if not r.image or not scene or r.image in seen:
            continue
        seen.add(r.image)
        pixels.append(vision.arrays(load_image(root / r.image))["pixel_values"][0])
        scenes.append(scene)
    if not pixels:
        raise ValueError("vision pretraining needs records with meta.scene (made by llavao1-data shapes)")
    return torch.from_numpy(np.stack(pixels)).half(), scenes


def _flip(scenes: list[list[dict]]) -> list[list[dict]]:
    return [[{**o, "x": 1.0 - o["x"]} for o in objs] for objs in scenes]


def pretrain_vision(tower, records, root: Path, vision, feature_layer: int, cfg: VisionPretrainConfig,
                    device, log=print, progress: bool | None = None) -> dict[str, float]:
    """Train `tower` (a SiglipVisionModel) in place; returns the last held-out accuracies logged."""
    from tqdm import tqdm

    pixels, scenes = load_scenes(records, root, vision)
    grid = tower.config.image_size // tower.config.patch_size
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(scenes), generator=g).tolist()
    n_hold = min(cfg.holdout, len(scenes) // 4)  # small datasets (tests) keep three quarters to train on
    hold, train_idx = order[:n_hold], order[n_hold:]
    heads = DenseHeads(tower.config.hidden_size).to(device)
    params = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps)))))

    def features(px: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, P, W]
        return tower(pixel_values=px.float().to(device), output_hidden_states=True).hidden_states[feature_layer]

    def evaluate() -> dict[str, float]:
        tower.eval()
        with torch.no_grad():
            px = pixels[hold]
            acc = dense_accuracy({k: v.cpu() for k, v in heads(features(px)).items()},
                                 scene_targets([scenes[i] for i in hold], grid))
        tower.train()
        return acc

    tower.train()
    bar = tqdm(total=cfg.steps, desc="vision pretrain", unit="step", file=sys.stderr,
               disable=None if progress is None else not progress)
    t0, pos = time.perf_counter(), 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > len(train_idx):
            perm = torch.randperm(len(train_idx), generator=g).tolist()
            train_idx, pos = [train_idx[i] for i in perm], 0
        idx = train_idx[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        px, sc = pixels[idx], [scenes[i] for i in idx]
        flip = torch.rand(len(idx), generator=g) < 0.5  # mirror half the batch: the world is left-right symmetric
        px = torch.where(flip[:, None, None, None], px.flip(-1), px)
        sc = [f if fl else s for s, f, fl in zip(sc, _flip(sc), flip.tolist(), strict=True)]
        tgt = {k: v.to(device) for k, v in scene_targets(sc, grid).items()}
        loss = dense_loss(heads(features(px)), tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            acc = evaluate()
            log({"vision_pretrain_step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - t0, 1),
                 **{f"holdout_{k}": round(v, 4) for k, v in acc.items()}})
    bar.close()
    return acc
