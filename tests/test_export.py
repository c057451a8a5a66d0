import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llavao1_edge.modelfile import ModelFileError, check_projector, describe
from llavao1_export.cli import main as export_main
from llavao1_export.errors import ExportError
from llavao1_export.gguf_convert import check_written, convert_to_gguf, write_plan
from llavao1_export.quantize import quantize_gguf
from llavao1_export.verify import verify
from llavao1_models.checkpoint import CheckpointError, load_checkpoint
from llavao1_models.gguf_plan import permute_qk, unpermute_qk
from llavao1_models.llava import plan_mmproj

# Tiny random models of several shapes: every one must convert and verify.
VARIANTS = {
    "gqa": {},  # 4 heads, 2 KV heads, untied
    "mha-tied": {"text_kv_heads": 4, "tie_embeddings": True},
    "vision3-layer-2": {"vision_layers": 3, "feature_layer": -2},
    "rope-base": {"rope_theta": 50000.0},
    "clip": {"vision_tower": "clip", "feature_layer": -2},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_convert_and_verify_variants(name, make_checkpoint, tmp_path):
    ckpt = make_checkpoint(name, **VARIANTS[name])
    res = convert_to_gguf(ckpt, tmp_path, "f32")
    report = verify(ckpt, str(res.text), str(res.mmproj), threads=2)
    (path,) = report.paths
    print(name, report.table())
    assert path.tokens_match
    assert path.text_max_abs_logit <= 1e-4
    assert path.text_top1_agreement == 1.0
    if name == "clip":
        # llama.cpp 0.3.36 mishandles CLS (issue #25814): the gap is reported, never judged as a pass.
        assert any("#25814" in w for w in res.warnings)
        assert "image_embd<=5e-3" not in path.checks and any("25814" in n for n in path.notes)
        assert path.image_max_abs_embd is not None
    else:
        assert path.image_max_abs_embd <= 5e-3
        assert path.checks == {"text_logits<=1e-4": True, "image_embd<=5e-3": True}
    assert report.passed


def test_sentencepiece_tokenizer_converts_with_identical_tokens(make_checkpoint, spm_tokenizer, tmp_path):
    ckpt = make_checkpoint("spm", tokenizer=spm_tokenizer)
    res = convert_to_gguf(ckpt, tmp_path, "f32")
    info = describe(res.text)
    assert info.facts["tokenizer"] == "llama"
    report = verify(ckpt, str(res.text), str(res.mmproj), threads=2)
    (path,) = report.paths
    print(report.table())
    assert path.tokens_match, path.notes  # llama.cpp's SPM tokenizer splits the chat prompt as transformers does
    assert path.text_max_abs_logit <= 1e-4 and path.image_max_abs_embd <= 5e-3 and report.passed


def test_a_tokenizer_that_adds_bos_in_its_post_processor_converts_with_bos(make_checkpoint, spm_tokenizer, tmp_path):
    """Llama tokenizers add BOS through tokenizer.json's TemplateProcessing, not tokenizer_config.json; the GGUF must
    say add_bos so llama.cpp tokenizes every prompt as transformers does, BOS and EOS included."""
    import copy
    import json

    from llavao1_edge.engine import Engine, EngineConfig

    tok = copy.deepcopy(spm_tokenizer)
    tok.add_bos_token = True  # transformers writes this as a TemplateProcessing post-processor
    ckpt = make_checkpoint("spm-bos", tokenizer=tok)
    assert json.loads((ckpt / "tokenizer.json").read_text())["post_processor"]["type"] == "TemplateProcessing"
    assert "add_bos_token" not in json.loads((ckpt / "tokenizer_config.json").read_text())
    res = convert_to_gguf(ckpt, tmp_path, "f32")
    from llavao1_edge.gguf_header import read_header

    assert read_header(res.text).fields["tokenizer.ggml.add_bos_token"].contents() is True
    text = "<|user|>\nHow many red circles are there?<|end|>\n<|assistant|>\n"
    with Engine(str(res.text), None, EngineConfig(n_ctx=512, n_seq_max=1)) as e:
        assert e.add_bos
        ids = e.tokenize(text, add_bos=e.add_bos)
        assert ids == tok(text)["input_ids"] and ids[0] == tok.bos_token_id
        assert e.is_eog(tok.eos_token_id)
    report = verify(ckpt, str(res.text), str(res.mmproj), threads=2)
    assert report.paths[0].tokens_match and report.passed


def test_gguf_metadata_and_types(make_checkpoint, tmp_path):
    ckpt = make_checkpoint("gqa")
    res = convert_to_gguf(ckpt, tmp_path, "f16")
    info = describe(res.text)
    assert info.architecture == "llama" and info.stage_format
    assert info.metadata["llavao1.source_sha256"] and info.metadata["llavao1.exporter_version"]
    assert info.tensor_types == {"F16": 16, "F32": 5}  # matrices F16, norms F32
    proj = describe(res.mmproj)
    assert proj.is_projector and proj.facts["projector_type"] == "mlp"
    assert proj.facts["feature_layer"] == [2]  # -1 with 2 blocks: run both
    bf = convert_to_gguf(ckpt, tmp_path / "bf", "bf16")
    assert "BF16" in describe(bf.text).tensor_types


def test_permutation_matches_rotate_half_layout():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of dim 4
    p = permute_qk(w, 2)
    # per head: new row 2j+a <- old row a*d/2 + j
    assert [int(r[0]) // 3 for r in p] == [0, 2, 1, 3, 4, 6, 5, 7]


def test_read_back_catches_a_mismatch(make_checkpoint, tmp_path):
    plan = plan_mmproj(load_checkpoint(make_checkpoint("gqa")), "f32")
    write_plan(plan, tmp_path / "m.gguf")
    check_written(plan, tmp_path / "m.gguf")
    name, data, qtype = plan.tensors[0]
    plan.tensors[0] = (name, data[:1], qtype)
    with pytest.raises(ExportError, match="after write"):
        check_written(plan, tmp_path / "m.gguf")


def test_bad_checkpoints_give_clear_errors_and_no_files(make_checkpoint, tmp_path):
    import shutil

    src = make_checkpoint("gqa")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        convert_to_gguf(broken, out)
    assert not list(out.glob("*.gguf")) if out.exists() else True
    (broken / "model.safetensors").write_bytes(data)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        convert_to_gguf(broken, out)
    (broken / "config.json").write_text(json.dumps({"architectures": ["MllamaForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="not supported; supported: LlavaForConditionalGeneration"):
        convert_to_gguf(broken, out)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        convert_to_gguf(broken, out)
    with pytest.raises(CheckpointError, match="hub id"):
        convert_to_gguf("llava-hf/llava-1.5-7b-hf", out)


def test_failed_export_leaves_nothing_under_the_final_name(make_checkpoint, tmp_path, monkeypatch):
    import llavao1_export.gguf_convert as gc

    calls = []

    def failing_check(plan, path):
        calls.append(path)
        if len(calls) == 2:  # the text file is written and checked; the projector fails
            raise ExportError("simulated failure")
        return check_written(plan, path)

    monkeypatch.setattr(gc, "check_written", failing_check)
    with pytest.raises(ExportError, match="simulated"):
        gc.convert_to_gguf(make_checkpoint("gqa"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_nothing_under_the_final_name(make_checkpoint, tmp_path):
    marker = tmp_path / "started"
    out = tmp_path / "out"
    code = f"""
import time, pathlib
import llavao1_export.gguf_convert as gc
real = gc.check_written
def slow(plan, path):
    real(plan, path)
    pathlib.Path({str(marker)!r}).write_text("x")
    time.sleep(60)
gc.check_written = slow
gc.convert_to_gguf({str(make_checkpoint("gqa"))!r}, {str(out)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []


def test_quantize_types_and_loading(trained, tmp_path):
    from llavao1_edge.engine import Engine, EngineConfig

    results = {}
    for q in ("Q8_0", "Q4_K_M"):
        text = quantize_gguf(trained.gguf, tmp_path / f"t-{q}.gguf", q)
        proj = quantize_gguf(trained.mmproj, tmp_path / f"m-{q}.gguf", q)
        results[q] = (text, proj)
        assert text.size_bytes < text.input_bytes
        with Engine(text.path, proj.path, EngineConfig(n_ctx=512, n_seq_max=2, n_threads=2)) as e:
            prompt = e.prepare(f"<|user|>\n{e.marker}\nHow many?<|end|>\n<|assistant|>\n",
                               trained.data / "images" / "train-2-000000.png")
            state, _ = e.eval_prompt(prompt)
            assert np.isfinite(state.logits).all()
    assert results["Q4_K_M"][0].tensor_types.keys() >= {"Q4_K", "Q6_K"}
    assert results["Q4_K_M"][0].fallbacks == []  # text widths are multiples of 256
    # the projector (width 64) cannot take 256-blocks: fallbacks are reported per tensor
    assert results["Q4_K_M"][1].fallbacks and results["Q4_K_M"][1].fallbacks[0]["used"] in ("q5_0", "q8_0")
    report = verify(trained.hf, str(results["Q4_K_M"][0].path), str(results["Q4_K_M"][1].path), threads=2)
    assert report.paths[0].quantized and report.paths[0].checks == {} and report.passed
    assert report.paths[0].text_max_abs_logit > 1e-4  # quantization error is reported, not hidden


def test_quantize_refusals(trained, tmp_path):
    with pytest.raises(ExportError, match="unknown quantization type"):
        quantize_gguf(trained.gguf, tmp_path / "x.gguf", "Q9_K")
    with pytest.raises(ExportError, match="overwrite the input"):
        quantize_gguf(trained.gguf, trained.gguf, "Q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        quantize_gguf(bad, tmp_path / "y.gguf", "Q8_0")


def test_model_from_llavao1_train_verifies(trained):
    report = verify(trained.hf, str(trained.gguf), str(trained.mmproj), threads=2)
    print(report.table())
    assert report.passed and report.paths[0].checks == {"text_logits<=1e-4": True, "image_embd<=5e-3": True}
    assert report.paths[0].text_top1_agreement == 1.0 and report.paths[0].image_top1_agreement == 1.0


def test_onnx_fp32_greedy_equals_transformers(trained, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from llavao1_export.onnx_export import OnnxLlava, export_onnx
    from llavao1_export.verify import Reference

    folder = export_onnx(trained.hf, tmp_path / "onnx")
    runner = OnnxLlava(folder)
    ref = Reference(trained.hf)
    ids, px = ref.image_ids(), ref.image_arrays()["pixel_values"]
    hf = AutoModelForImageTextToText.from_pretrained(trained.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pixel_values=px, max_new_tokens=40, do_sample=False, eos_token_id=runner.meta["eos_token_id"],
                          pad_token_id=0)
    want = out[0, len(ids):].tolist()
    assert runner.generate(ids, px.numpy()[0], 40) == want
    report = verify(trained.hf, onnx_dir=str(folder))
    assert report.passed and report.paths[0].checks == {"onnx_logits<=1e-4": True}


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_onnx_quantized_exports_run(trained, tmp_path, quant):
    from llavao1_export.onnx_export import OnnxLlava, export_onnx

    folder = export_onnx(trained.hf, tmp_path / quant, quant)
    runner = OnnxLlava(folder)
    assert runner.meta["quant"] == quant
    assert len(runner.generate([3, 204, 45], None, 5)) >= 1
    assert (folder / "decoder_model_merged.onnx").stat().st_size < 0.6 * (trained.gguf.stat().st_size)


def test_cli_gguf_inspect_and_verify(make_checkpoint, tmp_path, capsys):
    ckpt = make_checkpoint("gqa")
    assert export_main(["gguf", "--model", str(ckpt), "--out", str(tmp_path), "--outtype", "f32"]) == 0
    text, mmproj = capsys.readouterr().out.split()
    assert export_main(["inspect", text]) == 0
    shown = capsys.readouterr().out
    assert "four stages   yes" in shown and "llavao1.stage_format" in shown
    assert export_main(["verify", "--model", str(ckpt), "--gguf", text, "--mmproj", mmproj, "--json",
                        "--threads", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert export_main(["quantize", text, str(tmp_path / "q.gguf"), "--type", "nope"]) == 1
    assert "unknown quantization type" in capsys.readouterr().err


def test_wrong_key_type_in_mmproj_is_caught_before_llama_cpp(make_checkpoint, tmp_path):
    from gguf import GGUFValueType as T

    plan = plan_mmproj(load_checkpoint(make_checkpoint("gqa")), "f32")
    plan.keys = [(k, T.INT32 if k == "clip.vision.image_size" else t, v, it) for k, t, v, it in plan.keys]
    write_plan(plan, tmp_path / "bad-mmproj.gguf")
    with pytest.raises(ModelFileError, match="clip.vision.image_size has type INT32, llama.cpp needs UINT32"):
        check_projector(tmp_path / "bad-mmproj.gguf")


def _safetensors(folder) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_import_gguf_round_trips_a_trained_model_exactly(trained, tmp_path, capsys):
    """F32 GGUF -> checkpoint gives back the trained weights bit for bit, a tokenizer that encodes
    the same ids, and a checkpoint that exports to the same GGUF tensors again and fine-tunes."""
    from transformers import AutoTokenizer

    from llavao1_train.trainer import TrainConfig, train

    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(unpermute_qk(permute_qk(w, 4), 4), w)
    out = tmp_path / "imported"
    assert export_main(["import", str(trained.gguf), str(trained.mmproj), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    original, back = _safetensors(trained.hf), _safetensors(out)
    unused = {k for k in original if "post_layernorm" in k}  # never read by LLaVA, not exported
    assert set(back) - unused == set(original) - unused
    diffs = {k: float(np.abs(back[k] - original[k]).max()) for k in set(original) - unused}
    print("max |Δ| per tensor, worst:", max(diffs.values()))
    assert max(diffs.values()) == 0.0
    tok_a, tok_b = AutoTokenizer.from_pretrained(trained.hf), AutoTokenizer.from_pretrained(out)
    texts = [json.loads(line)["conversations"][1]["value"] for line in open(trained.data / "records.jsonl")][:20]
    texts += ["<|user|>\n<image>\nHow many red circles?<|end|>\n<|assistant|>\n<SUMMARY> ünïcode ✓ </SUMMARY>"]
    assert [tok_b.encode(t) for t in texts] == [tok_a.encode(t) for t in texts]
    assert tok_b.chat_template == tok_a.chat_template and tok_b.eos_token == tok_a.eos_token
    again = convert_to_gguf(out, tmp_path / "again", "f32")
    for first, second in ((trained.gguf, again.text), (trained.mmproj, again.mmproj)):
        import gguf

        a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(first)).tensors}
        b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(second)).tensors}
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    final = train(TrainConfig(data=str(trained.data), out=str(tmp_path / "ft"), model=str(out), full=True,
                              max_steps=2, lr=1e-4, batch_size=4, max_length=1024, device="cpu", progress=False))
    assert (final / "model.safetensors").is_file()


def test_import_gguf_refusals(trained, tmp_path):
    from llavao1_export.gguf_import import import_gguf

    with pytest.raises(ExportError, match="give the text model first"):  # the two files swapped
        import_gguf(trained.mmproj, trained.gguf, tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        import_gguf(trained.gguf, trained.mmproj, busy)
    q = quantize_gguf(trained.gguf, tmp_path / "q8.gguf", "Q8_0")
    res = import_gguf(q.path, trained.mmproj, tmp_path / "from-q8")
    assert res.tensor_types.get("Q8_0") and "dequantized Q8_0" in res.notes[0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.parametrize("outtype,rel", [("f16", 1e-3), ("bf16", 8e-3)])
def test_import_gguf_reads_half_precision_back(make_checkpoint, tmp_path, outtype, rel):
    from llavao1_export.gguf_import import import_gguf

    ckpt = make_checkpoint("gqa")
    res = convert_to_gguf(ckpt, tmp_path / "g", outtype)
    back = import_gguf(res.text, res.mmproj, tmp_path / "back")
    assert back.tensor_types.get(outtype.upper()) and back.notes == []  # half types are exact reads, not dequantized
    original, got = _safetensors(ckpt), _safetensors(tmp_path / "back")
    worst = max(float(np.abs(got[k] - original[k]).max() / np.abs(original[k]).max())
                for k in original if "post_layernorm" not in k)
    print(f"{outtype}: worst max |Δ| / max |w| {worst:.2e}")
    assert 0 < worst < rel
