"""Fine-tuning real families end to end: tiny random SmolVLM, Qwen2-VL and Qwen2.5-VL checkpoints (tests/families.py)
trained with LoRA and fully, then exported, verified against transformers, quantized and run with stage search."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llavao1_data.shapes import ShapesConfig, write_dataset
from llavao1_edge import cli
from llavao1_edge.stages import STAGE_NAMES
from llavao1_train.cli import main as train_main
from llavao1_train.tokenizer import STAGE_TOKENS


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-families") / "d16"
    write_dataset(ShapesConfig(n=16, seed=1, kinds=("cot",)), out, progress=False)
    return out


def _train(data, src, out, *extra) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--model", str(src), "--batch-size", "4", "--lr", "1e-3", "-q",
            "--device", "cpu", "--log-every", "1", *extra]


def _params(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return dict(AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


@pytest.mark.parametrize("name", ["smolvlm", "qwen2vl", "qwen2.5vl"])
def test_lora_adds_the_stage_tags_trains_the_decoder_and_exports_a_verified_pair(families, data16, name, tmp_path,
                                                                                capsys):
    from transformers import AutoTokenizer

    from llavao1_export.gguf_convert import convert_to_gguf
    from llavao1_export.verify import verify

    f = families[name]
    out = tmp_path / "lora"
    assert train_main(_train(data16, f.hf, out, "--lora", "--max-steps", "3", "--eval-data", str(data16),
                             "--eval-every", "3", "--eval-limit", "1")) == 0
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in STAGE_TOKENS)  # one id per tag
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(e["batch_loss"] > 0 and e["batch_loss_other_images"] > 0 for e in log if "loss" in e)
    assert [e["eval_n"] for e in log if "eval_accuracy" in e] == [1]  # greedy generation with the family's inputs
    base, tuned = _params(f.hf), _params(out / "final")
    changed = {n for n, p in base.items() if p.shape != tuned[n].shape or not torch.equal(p, tuned[n])}
    emb = next(n for n in base if n.endswith("embed_tokens.weight"))
    old = base[emb].shape[0]
    assert tuned[emb].shape[0] == old + len(STAGE_TOKENS)
    assert torch.equal(tuned[emb][:old], base[emb]) and not torch.equal(tuned[emb][old:], tuned[emb][old:].mean(0))
    assert any("q_proj" in n for n in changed)  # LoRA merged into the decoder
    vision = {"smolvlm": "vision_model", "qwen2vl": "visual.blocks", "qwen2.5vl": "visual.blocks"}[name]
    projector = {"smolvlm": "connector", "qwen2vl": "merger", "qwen2.5vl": "merger"}[name]
    assert not any(vision in n or projector in n for n in changed), sorted(changed)  # the image path untouched

    res = convert_to_gguf(out / "final", tmp_path / "gguf", "f32")
    report = verify(out / "final", str(res.text), str(res.mmproj), threads=2)
    print(report.table())
    assert report.passed and report.paths[0].checks == {"text_logits<=1e-4": True, "image_embd<=5e-3": True}
    capsys.readouterr()
    assert cli.main(["info", str(res.text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stage_tags_single_tokens"] is True
    img = sorted((data16 / "images").iterdir())[0]
    assert cli.main(["run", str(img), "How many objects are there?", "--model", str(res.text), "--mmproj",
                     str(res.mmproj), "--search", "stage", "-n", "2", "--force-format", "--json",
                     "--max-stage-tokens", "8", "--threads", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["unit"] for s in doc["steps"][:4]] == list(STAGE_NAMES)
    assert doc["text"].count("<SUMMARY>") == 1 and doc["text"].count("</CONCLUSION>") == 1


@pytest.mark.parametrize("name", ["smolvlm", "qwen2.5vl"])
def test_full_fine_tuning_trains_every_part_and_quantizes(families, data16, name, tmp_path):
    from llavao1_export.gguf_convert import convert_to_gguf
    from llavao1_export.quantize import quantize_gguf
    from llavao1_export.verify import verify

    f = families[name]
    out = tmp_path / "full"
    assert train_main(_train(data16, f.hf, out, "--full", "--max-steps", "2")) == 0
    base, tuned = _params(f.hf), _params(out / "final")
    unchanged = {n for n, p in base.items() if p.shape == tuned[n].shape and torch.equal(p, tuned[n])}
    assert not unchanged, sorted(unchanged)  # decoder, tower and projector all trained
    res = convert_to_gguf(out / "final", tmp_path / "gguf", "f32")
    q = quantize_gguf(str(res.text), str(tmp_path / "q8.gguf"), "Q8_0")
    report = verify(out / "final", str(q.path), str(res.mmproj), threads=2)
    print(report.table())
    (path,) = report.paths
    assert path.quantized and path.tokens_match and path.text_top1_agreement >= 0.75


def test_lora_options_reach_the_tower_and_the_projector(families, data16, tmp_path):
    f = families["qwen2vl"]
    out = tmp_path / "lora-all"
    assert train_main(_train(data16, f.hf, out, "--lora", "--lora-vision", "--train-projector", "--max-steps", "2")) == 0
    base, tuned = _params(f.hf), _params(out / "final")
    changed = {n for n, p in base.items() if p.shape != tuned[n].shape or not torch.equal(p, tuned[n])}
    assert any("visual.blocks" in n and "qkv" in n for n in changed) and any("merger" in n for n in changed)


def test_pixel_limits_bound_the_image_tokens_as_the_runtime_flag_does(families, data16, tmp_path):
    """--max-pixels in training and --image-max-tokens at run time size an image the same way."""
    from transformers import AutoTokenizer

    from llavao1_edge.engine import Engine, EngineConfig
    from llavao1_edge.images import load_image
    from llavao1_models.checkpoint import read_image_processor
    from llavao1_models.qwen2vl import FAMILY

    f = families["qwen2vl"]
    img = load_image(sorted((data16 / "images").iterdir())[0])
    config = json.loads((f.hf / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(f.hf)
    small = FAMILY.inputs(config, read_image_processor(f.hf), tok, (4 * 28 * 28, 4 * 28 * 28))
    default = FAMILY.inputs(config, read_image_processor(f.hf), tok)
    n_small = small.prompt(*img.size).count("<|image_pad|>")
    assert n_small <= 4 < default.prompt(*img.size).count("<|image_pad|>")
    with pytest.raises(ValueError, match="at least 6272 pixels is more than at most 3136"):
        FAMILY.inputs(config, read_image_processor(f.hf), tok, (None, 4 * 28 * 28))
    cfg = EngineConfig(n_ctx=512, n_seq_max=1, image_min_tokens=4, image_max_tokens=4)
    with Engine(str(f.gguf), str(f.mmproj), cfg) as e:
        prompt = e.prepare(f"{e.marker}\nhi", img)
        assert [c.n_tokens for c in prompt.chunks if hasattr(c, "n_pos")] == [n_small]
        e.free_prompt(prompt)
    from llavao1_edge.modelfile import ModelFileError

    with pytest.raises(ModelFileError, match="the least may not exceed the most"):
        Engine(str(f.gguf), str(f.mmproj), EngineConfig(n_ctx=512, n_seq_max=1, image_max_tokens=4))
    assert train_main(_train(data16, f.hf, tmp_path / "r", "--lora", "--max-steps", "1", "--min-pixels", "9",
                             "--max-pixels", "8")) == 1


def _cmd(data, src, out, *extra):
    return [sys.executable, "-m", "llavao1_train.cli", *_train(data, src, out, *extra)]


@pytest.mark.slow
def test_qwen_lora_kill_and_resume_equals_an_uninterrupted_run(families, data16, tmp_path):
    src = families["qwen2vl"].hf
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ("--lora", "--max-steps", "8", "--save-every", "2")
    ref = subprocess.run(_cmd(data16, src, tmp_path / "ref", *args), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data16, src, out, *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000004").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()
    resumed = subprocess.run(_cmd(data16, src, out, *args, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print("max |resumed - uninterrupted|", diff)
    assert a.keys() == b.keys() and diff == 0.0


@pytest.mark.slow
def test_qwen_ddp_two_processes_keep_identical_weights(families, data16, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "llavao1_train.cli", *_train(data16, families["qwen2.5vl"].hf, out, "--lora", "--max-steps", "3",
                                               "--batch-size", "2")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = [e for e in log if "replica_checksums" in e][-1]
    assert len(final["replica_checksums"]) == 2 and final["replicas_identical"] is True
