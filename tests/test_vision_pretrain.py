"""Vision pretraining: labels that match the pixels, and a run through llavao1-train."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llavao1_data.records import read_records
from llavao1_data.shapes import ShapesConfig, write_dataset
from llavao1_data.shapes.scene import BACKGROUND, COLORS
from llavao1_edge.images import load_image, preprocess
from llavao1_train.cli import main as train_main
from llavao1_train.vision_pretrain import _COLORS, _flip, scene_targets


@pytest.fixture(scope="module")
def data48(tmp_path_factory):
    out = tmp_path_factory.mktemp("vp") / "d48"
    write_dataset(ShapesConfig(n=48, seed=3, kinds=("cot",)), out, progress=False)
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_labels_sit_on_the_pixels_of_their_object(data48, flip):
    """Each labelled patch + offset points at a pixel of the labelled colour: catches a transposed
    raster (rows vs columns), a wrong flip and an off-by-one patch."""
    size, grid = 96, 8
    checked = 0
    for r in list(read_records(data48 / "records.jsonl"))[:16]:
        px = preprocess(load_image(data48 / r.image), size, (0, 0, 0), (1 / 255,) * 3)  # [3, S, S] in 0..255
        scene = r.meta["scene"]
        if flip:
            px, scene = px[:, :, ::-1], _flip([scene])[0]
        t = scene_targets([scene], grid)
        assert int((t["color"][0] > 0).sum()) == len(scene)  # one patch per object
        assert int(t["count"][0]) == len(scene) - 1
        for k in torch.nonzero(t["color"][0]).flatten().tolist():
            row, col = divmod(k, grid)
            dx, dy = t["offset"][0, k].tolist()
            x, y = int((col + dx) * size / grid), int((row + dy) * size / grid)
            want = np.array(COLORS[_COLORS[int(t["color"][0, k]) - 1]], dtype=float)
            got = px[:, y, x]
            assert np.abs(got - want).max() < 40, (r.id, k, got, want)
            assert np.abs(got - np.array(BACKGROUND)).max() > 40
            checked += 1
    assert checked >= 16


def test_train_with_vision_pretraining(data48, tmp_path):
    out = tmp_path / "run"
    rc = train_main(["--data", str(data48), "--out", str(out), "--init", "test-tiny", "--max-steps", "2",
                     "--batch-size", "4", "--lr", "1e-3", "-q", "--device", "cpu", "--pretrain-vision-steps", "40", "--log-every", "10",
                     "--save-every", "1"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    vp = [e for e in log if "vision_pretrain_step" in e]
    assert vp[-1]["vision_pretrain_step"] == 40 and vp[-1]["loss"] < 0.85 * vp[0]["loss"], vp
    assert {"holdout_scene_colors", "holdout_scene_all", "holdout_count"} <= vp[-1].keys()
    tower = load_file(out / "vision_pretrain.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    key = next(k for k in final if k.endswith("vision_tower.embeddings.patch_embedding.weight"))
    # the LLaVA stage started from the pretrained tower: 2 steps at lr 1e-3 move it only a little
    start = tower["embeddings.patch_embedding.weight"]
    assert (final[key] - start).abs().max() < 0.01 < start.abs().max()
    # a resumed run loads its checkpoint and does not pretrain again
    rc = train_main(["--data", str(data48), "--out", str(out), "--init", "test-tiny", "--max-steps", "3",
                     "--batch-size", "4", "-q", "--device", "cpu", "--pretrain-vision-steps", "40", "--resume"])
    assert rc == 0
    log2 = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len([e for e in log2 if "vision_pretrain_step" in e]) == len(vp)


def test_vision_pretraining_needs_a_from_scratch_model(data48, make_checkpoint, tmp_path, capsys):
    ckpt = make_checkpoint()
    capsys.readouterr()
    rc = train_main(["--data", str(data48), "--out", str(tmp_path / "r"), "--model", str(ckpt),
                     "--pretrain-vision-steps", "5", "-q", "--device", "cpu"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrain-vision-steps" in err[0]


def test_frozen_pretrained_tower_stays_the_pretrained_one(data48, tmp_path, capsys):
    """--freeze-vision with --init: the LLaVA stage leaves the pretrained tower bit-identical, also
    across --resume (the frozen tower is in no checkpoint, so the run must reload it)."""
    out = tmp_path / "frozen"
    args = ["--data", str(data48), "--out", str(out), "--init", "test-tiny", "--batch-size", "4", "--lr", "1e-3",
            "-q", "--device", "cpu", "--pretrain-vision-steps", "10", "--freeze-vision", "--save-every", "1"]
    assert train_main([*args, "--max-steps", "2"]) == 0
    tower = load_file(out / "vision_pretrain.safetensors")
    final = load_file(out / "final" / "model.safetensors")
    prefix = next(k for k in final if k.endswith("vision_tower.embeddings.patch_embedding.weight"))[
        : -len("embeddings.patch_embedding.weight")]
    for k, v in tower.items():
        assert torch.equal(final[prefix + k], v), k
    state = load_file(out / "checkpoints" / "step-0000001" / "model.safetensors")
    # only what trains is checkpointed: the projector and the decoder, not the tower
    assert not any("vision_tower" in k for k in state)
    assert any("multi_modal_projector" in k for k in state) and any("language_model" in k for k in state)
    assert train_main([*args, "--max-steps", "3", "--resume"]) == 0
    resumed = load_file(out / "final" / "model.safetensors")
    for k, v in tower.items():
        assert torch.equal(resumed[prefix + k], v), k
    capsys.readouterr()
    assert train_main(["--data", str(data48), "--out", str(tmp_path / "r"), "--init", "test-tiny", "--freeze-vision",
                       "-q", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--freeze-vision" in err[0] and "--pretrain-vision-steps" in err[0]
