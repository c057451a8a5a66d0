"""Training: the loss mask on a real batch, a short run, DDP with two processes, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llavao1_data.records import read_records
from llavao1_data.shapes import ShapesConfig, write_dataset
from llavao1_edge.stages import parse_answer
from llavao1_train.cli import main as train_main
from llavao1_train.data import IGNORE, Conversations, collate, image_arrays, tokenize_record
from llavao1_train.specs import get_spec
from llavao1_train.tokenizer import EOS


@pytest.fixture(scope="module")
def data64(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "d64"
    write_dataset(ShapesConfig(n=64, seed=1, kinds=("cot",)), out, progress=False)
    return out


def test_loss_mask_on_a_real_batch(data64, tiny_tokenizer):
    from llavao1_models.llava import FAMILY, build_model

    spec = get_spec("test-tiny")
    image_id = tiny_tokenizer.convert_tokens_to_ids("<image>")
    config = build_model(spec, tiny_tokenizer).config.to_dict()
    vision = FAMILY.inputs(config, {"image_mean": spec.image_mean, "image_std": spec.image_std}, tiny_tokenizer)
    recs = list(read_records(data64 / "records.jsonl"))[:4]
    conv = Conversations(tiny_tokenizer, "test-tiny")
    examples = [tokenize_record(tiny_tokenizer, conv, vision, r, 2048, data64) for r in recs]
    batch = collate(examples, [image_arrays(e, vision) for e in examples], tiny_tokenizer.pad_token_id, vision)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    for i, (rec, ex) in enumerate(zip(recs, examples, strict=True)):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        n = len(ex.input_ids)
        assert (ids == image_id).sum() == spec.image_tokens  # one placeholder expanded to every patch
        assert (labels[ids == image_id] == IGNORE).all()  # image tokens masked
        assert (labels[n:] == IGNORE).all() and (batch["attention_mask"][i, n:] == 0).all()  # padding masked
        trained = tiny_tokenizer.decode([t for t in labels.tolist() if t != IGNORE])
        assert trained.startswith(rec.answer) and trained.rstrip("\n").endswith(EOS)  # answer + end token only
        first = next(j for j, t in enumerate(labels.tolist()) if t != IGNORE)
        prompt = tiny_tokenizer.decode(ids[:first].tolist())
        assert prompt.endswith("<|assistant|>\n") and rec.question.split("\n")[0] in prompt  # prompt masked


def test_short_cpu_run_loss_falls_and_checkpoint_loads(data64, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    rc = train_main(["--data", str(data64), "--out", str(out), "--init", "test-tiny", "--max-steps", "20",
                     "--lr", "2e-3", "--batch-size", "8", "--log-every", "5", "-q", "--device", "cpu",
                     "--eval-data", str(data64), "--eval-every", "20", "--eval-limit", "2"])
    assert rc == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(e["tokens_per_s"] > 0 for e in log if "loss" in e)
    assert all(0 < e["padding"] < 0.9 for e in log if "loss" in e)  # records of several lengths: some padding
    assert all(e["batch_loss_other_images"] > 0 and e["batch_loss"] > 0 for e in log if "loss" in e)
    evals = [e for e in log if "eval_accuracy" in e]
    assert evals and evals[0]["step"] == 20 and evals[0]["eval_n"] == 2 and 0.0 <= evals[0]["eval_accuracy"] <= 1.0
    model = AutoModelForImageTextToText.from_pretrained(out / "final")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (out / "final" / "chat_template.jinja").is_file() and (out / "final" / "processor_config.json").is_file()


@pytest.mark.slow
def test_bf16_autocast_on_cpu_tracks_fp32_and_saves_fp32_weights(data64, tmp_path):
    logs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert train_main(["--data", str(data64), "--out", str(out), "--init", "test-tiny", "--max-steps", "12",
                           "--lr", "2e-3", "--batch-size", "8", "--log-every", "1", "-q", "--device", "cpu",
                           "--precision", precision]) == 0
        logs[precision] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        weights = load_file(out / "final" / "model.safetensors")
        assert {t.dtype for t in weights.values()} == {torch.float32}  # autocast: master weights stay fp32
    fp32, bf16 = logs["fp32"], logs["bf16"]
    assert bf16[0] != fp32[0]  # bf16 rounding shows: autocast was on
    assert abs(bf16[0] - fp32[0]) < 0.01 * fp32[0], (fp32[0], bf16[0])  # same model, same batch, rounding only
    assert bf16[-1] < 0.8 * bf16[0] and abs(bf16[-1] - fp32[-1]) < 0.15 * fp32[-1], (fp32, bf16)


def test_unknown_precision_is_refused(data64, tmp_path):
    from llavao1_train.trainer import TrainConfig, TrainError, train

    with pytest.raises(TrainError, match="precision 'fp8'"):
        train(TrainConfig(data=str(data64), out=str(tmp_path / "r"), init="test-tiny", max_steps=1, precision="fp8"))


def test_lora_on_a_checkpoint_merges_into_a_plain_model(data64, make_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText

    src = make_checkpoint("gqa")
    out = tmp_path / "lora"
    assert train_main(["--data", str(data64), "--out", str(out), "--model", str(src), "--lora", "--max-steps", "3",
                       "--lr", "1e-3", "--batch-size", "4", "-q", "--device", "cpu"]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(out / "final")
    base = AutoModelForImageTextToText.from_pretrained(src)
    names = dict(merged.named_parameters())
    assert not any("lora" in n for n in names)
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, names[n])]
    assert any("language_model" in n and "q_proj" in n for n in changed)  # LoRA merged into the decoder
    assert any("multi_modal_projector" in n for n in changed)  # projector trained fully
    assert not any("vision_tower" in n for n in changed)  # vision untouched


def test_bad_data_is_an_error_or_a_counted_skip(data64, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data64, bad)
    lines = (bad / "records.jsonl").read_text().splitlines()
    obj = json.loads(lines[3])
    obj["image"] = "images/missing.png"
    lines[3] = json.dumps(obj)
    lines.insert(5, "{not json")
    (bad / "records.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--data", str(bad), "--out", str(tmp_path / "r"), "--init", "test-tiny", "--max-steps", "2",
            "--batch-size", "4", "-q", "--device", "cpu"]
    assert train_main(args) == 1
    err = capsys.readouterr().err
    assert "records.jsonl:4: image file not found" in err and err.count("\n") == 1
    assert train_main(args + ["--skip-bad"]) == 0
    assert "skipped 2 bad records" in capsys.readouterr().err
    assert train_main(["--data", str(data64), "--out", str(tmp_path / "long"), "--init", "test-tiny",
                       "--max-steps", "2", "--max-length", "40", "-q", "--device", "cpu"]) == 1
    assert "over the limit of 40 (--max-length)" in capsys.readouterr().err
    assert train_main(["--data", str(data64), "--out", str(tmp_path / "hub"), "--model", "org/some-model",
                       "-q", "--device", "cpu"]) == 1
    assert "hub id" in capsys.readouterr().err


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "llavao1_train.cli", "--data", str(data), "--out", str(out), "--init", "test-tiny",
            "--batch-size", "4", "--lr", "1e-3", "-q", "--device", "cpu", *extra]


def _padding(lengths, order, per_step):
    """Padded tokens / real tokens over the full batches of `order`."""
    batches = [order[i:i + per_step] for i in range(0, len(order) - per_step + 1, per_step)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches) / sum(lengths[i] for b in batches for i in b)


def test_epoch_order_grouped_by_length_cuts_padding_and_keeps_every_example():
    from llavao1_train.batching import MEGABATCH, epoch_order

    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(100, 600, (16 * MEGABATCH * 2 + 5,), generator=g).tolist()  # 2 megabatches + a tail
    plain = epoch_order(lengths, 16, seed=0, epoch=1)
    assert plain == torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()  # unchanged
    grouped = epoch_order(lengths, 16, seed=0, epoch=1, group=True)
    assert sorted(grouped) == list(range(len(lengths)))  # a permutation: each example once per epoch
    assert grouped == epoch_order(lengths, 16, seed=0, epoch=1, group=True)  # seed-determined: resume is exact
    assert grouped != epoch_order(lengths, 16, seed=0, epoch=2, group=True)
    before, after = _padding(lengths, plain, 16), _padding(lengths, grouped, 16)
    print(f"padded/real tokens: random batches {before:.3f}, grouped {after:.3f}")
    assert before > 1.3 and after < 1.05
    firsts = [grouped[i] for i in range(0, 16 * MEGABATCH * 2, 16)]  # batches are shuffled, not left sorted
    assert any(lengths[a] > lengths[b] for a, b in zip(firsts, firsts[1:], strict=False))


def test_length_split_partitions_a_batch_into_runs_that_compute_the_fewest_cells():
    from llavao1_train.batching import length_split

    def cells(parts):
        return sum(len(p) * max(lengths[i] for i in p) for p in parts)

    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        lengths = torch.randint(80, 900, (16,), generator=g).tolist()
        parts = length_split(lengths, 4)
        assert sorted(i for p in parts for i in p) == list(range(16)) and 1 <= len(parts) <= 4
        spans = [(min(lengths[i] for i in p), max(lengths[i] for i in p)) for p in parts]
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:], strict=False))  # runs of sorted lengths
        order = sorted(range(16), key=lambda i: lengths[i])
        for k in (2, 3):  # the optimum over every cut of the sorted lengths into at most k runs, by brute force
            best = min(cells([order[a:b] for a, b in zip((0, *cuts), (*cuts, 16), strict=True)])
                       for n in range(k) for cuts in combinations(range(1, 16), n))
            assert cells(length_split(lengths, k)) == best < cells([order])
    assert length_split([300] * 8, 4) == [list(range(8))]  # equal lengths: one pass, not four
    assert length_split([100, 900], 1) == [[0, 1]]


@pytest.mark.slow
def test_length_split_gives_the_unsplit_gradient_with_less_padding(tmp_path):
    data = tmp_path / "d"
    write_dataset(ShapesConfig(n=64, seed=1, kinds=("cot", "judge")), data, progress=False)  # lengths vary ~3x
    logs, weights = {}, {}
    for n in (1, 4):
        out = tmp_path / f"split{n}"
        assert train_main(["--data", str(data), "--out", str(out), "--init", "test-tiny", "--max-steps", "3",
                           "--lr", "2e-3", "--batch-size", "16", "--log-every", "1", "-q", "--device", "cpu",
                           "--length-split", str(n)]) == 0
        logs[n] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
        weights[n] = load_file(out / "final" / "model.safetensors")
    for one, split in zip(logs[1], logs[4], strict=True):  # same examples, same loss: rounding apart
        assert abs(one["loss"] - split["loss"]) < 1e-5 * one["loss"], (one["loss"], split["loss"])
        for key in ("batch_loss", "batch_loss_other_images"):  # the image check sees the whole batch either way
            assert abs(one[key] - split[key]) < 1e-4 * one[key], (key, one[key], split[key])
    assert sum(r["padding"] for r in logs[4]) < 0.8 * sum(r["padding"] for r in logs[1])
    diff = max((weights[1][k] - weights[4][k]).abs().max().item() for k in weights[1])
    print("max |split - unsplit| weight after 3 steps:", diff)
    assert diff < 1e-4


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(data64, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --group-by-length: the resumed run must rebuild the same length-grouped batches (24 steps = 1.5 epochs)
    ref = subprocess.run(_train_cmd(data64, tmp_path / "ref", "--max-steps", "24", "--group-by-length"), env=env,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data64, out, "--max-steps", "24", "--save-every", "4", "--group-by-length"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-0000008").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "final").exists()  # killed mid-run
    assert (out / "checkpoints" / "step-0000008").is_dir()
    resumed = subprocess.run(_train_cmd(data64, out, "--max-steps", "24", "--save-every", "4", "--group-by-length",
                                        "--resume"),
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print("max |resumed - uninterrupted|", diff)
    assert diff == 0.0


def test_checkpoints_hold_only_safetensors_and_json(data64, tmp_path, capsys):
    """No pickle anywhere: loading a checkpoint from elsewhere reads data and runs none of it."""
    from llavao1_train.checkpoints import STATE_FILES

    out = tmp_path / "r"
    args = ["--data", str(data64), "--out", str(out), "--init", "test-tiny", "--save-every", "1", "-q", "--device", "cpu"]
    assert train_main([*args, "--max-steps", "1"]) == 0
    ck = out / "checkpoints" / "step-0000001"
    assert sorted(p.name for p in ck.iterdir()) == sorted(STATE_FILES)
    json.loads((ck / "state.json").read_text())  # plain JSON
    (ck / "rng.safetensors").unlink()
    assert train_main([*args, "--max-steps", "2", "--resume"]) == 1
    assert "not a training checkpoint (missing rng.safetensors)" in capsys.readouterr().err


def test_refuses_to_mix_runs(data64, tmp_path):
    out = tmp_path / "r"
    assert train_main(["--data", str(data64), "--out", str(out), "--init", "test-tiny", "--max-steps", "2",
                       "--save-every", "1", "-q", "--device", "cpu"]) == 0
    assert train_main(["--data", str(data64), "--out", str(out), "--init", "test-tiny", "--max-steps", "2",
                       "-q", "--device", "cpu"]) == 1


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_weights(data64, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "llavao1_train.cli", "--data", str(data64), "--out", str(out), "--init", "test-tiny",
           "--max-steps", "4", "--batch-size", "2", "--lr", "1e-3", "-q", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = [e for e in log if "replica_checksums" in e][-1]
    assert len(final["replica_checksums"]) == 2 and final["replicas_identical"] is True
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["world_size"] == 2
    assert parse_answer("<SUMMARY>x</SUMMARY>").stages  # the run folder is a normal run folder
    assert (out / "final" / "model.safetensors").is_file()


def test_missing_extra_is_one_line_and_exit_2(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train_main(["--data", "x", "--out", "y", "--init", "test-tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'llavao1-edge[train]'" in err and "peft" in err
