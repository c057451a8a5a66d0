"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

    OUT/checkpoints/step-NNNNNNN/
      model.safetensors      the trainable parameters
      optimizer.safetensors  the optimizer's per-parameter state (AdamW moments and step counts)
      rng.safetensors        torch's CPU and CUDA generator states, numpy's key
      state.json             step, data position, optimizer hyperparameters, scheduler, the other RNG values

Loading a checkpoint from elsewhere reads data and runs none of it. Each checkpoint is written to a
temporary folder and renamed, so a killed run leaves the last complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _optimizer_parts(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as tensors ("PARAM.NAME") and the JSON rest."""
    tensors, scalars = {}, {}
    for pid, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    kind, key, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np.asarray(key, dtype=np.uint32).copy())}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(internal), gauss_next]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy(), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(out: Path, step: int, model, optimizer, scheduler, position: dict, keep: int) -> Path:
    """OUT/checkpoints/step-N, written to a temporary folder and renamed; keeps the last `keep`."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {n: p.detach().cpu().contiguous() for n, p in _unwrap(model).named_parameters() if p.requires_grad}
    save_file(trainable, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_parts(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_meta = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "position": position, "optimizer": opt_meta,
                                                "scheduler": scheduler.state_dict(), "rng": rng_meta}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    return found[-1] if found else None


def load_training_state(path: Path, model, optimizer, scheduler) -> dict:
    """Restore a checkpoint into model, optimizer, scheduler and the RNGs; returns step and position."""
    missing = [f for f in STATE_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    state = json.loads((path / "state.json").read_text())
    params = dict(_unwrap(model).named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path / "model.safetensors")).items():
            params[name].copy_(tensor.to(params[name].device))
    optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return {"step": state["step"], "position": state["position"]}
