"""Shared fixtures: tiny models built in-process (nothing is downloaded).

- `tiny_tokenizer`: a byte-level BPE trained on generated shapes texts.
- `make_checkpoint(**spec_overrides)`: a random test-tiny LLaVA checkpoint folder.
- `shipped`: the model the package ships (F16 files) and its example questions: the runtime's tests.
- `trained`: shapes data -> `llavao1-train --init test-tiny` -> GGUF F32 files, for the chain's tests
  (export, verify, import, bench sweeps); the tests that use it are marked slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_texts(tmp_path_factory) -> list[str]:
    from llavao1_data.records import read_records
    from llavao1_data.shapes import ShapesConfig, write_dataset

    out = tmp_path_factory.mktemp("tok-data") / "d"
    write_dataset(ShapesConfig(n=48, seed=99), out, progress=False)
    return [t.value for r in read_records(out / "records.jsonl") for t in r.conversations]


@pytest.fixture(scope="session")
def tiny_tokenizer(shapes_texts):
    from llavao1_train.tokenizer import train_tokenizer

    return train_tokenizer(shapes_texts, 400)


@pytest.fixture(scope="session")
def spm_tokenizer(shapes_texts):
    """A SentencePiece-style BPE as transformers writes Llama-2 tokenizers: byte fallback, '▁', Prepend."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llavao1_train.tokenizer import CHAT_TEMPLATE, STAGE_TOKENS

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    base.normalizer = norm
    base.train_from_iterator(shapes_texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                               show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte-fallback pieces, as SentencePiece has them
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>", "<image>"])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in STAGE_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>",
                                   pad_token="<|pad|>", extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    fast.add_bos_token = False
    return fast


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tiny_tokenizer):
    from llavao1_models.llava import build_model, save_checkpoint
    from llavao1_train.specs import get_spec

    made: dict[str, Path] = {}

    def make(name: str = "base", seed: int = 0, tokenizer=None, **overrides) -> Path:
        if name not in made:
            tok = tokenizer or tiny_tokenizer
            spec = get_spec("test-tiny", **overrides)
            folder = tmp_path_factory.mktemp("ckpt") / name
            save_checkpoint(build_model(spec, tok, seed=seed), tok, spec, folder)
            made[name] = folder
        return made[name]

    return make


@dataclass
class Shipped:
    gguf: Path  # F16 text model
    mmproj: Path  # F16 projector
    questions: list[tuple[Path, str, str]]  # (image, question, reference answer): the shipped examples


@pytest.fixture(scope="session")
def shipped() -> Shipped:
    """The model the package ships, at F16 (its quantized file rounds multi-row batches differently)."""
    from llavao1_data.records import read_records
    from llavao1_edge.api import MODELS_DIR, shipped_model

    files = shipped_model()
    examples = MODELS_DIR.parent / "examples"
    questions = [(examples / r.image, r.question, r.meta["answer"]) for r in read_records(examples / "questions.jsonl")]
    return Shipped(files["unquantized"], files["mmproj"], questions)


def as_f32(src: Path, dst: Path) -> Path:
    """A copy of a GGUF file with its F16 tensors widened to F32 (every key kept): llama.cpp's batched kernels
    round F32 weights like its one-row ones, so parity tests can ask for 1e-5."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        value = 0 if key == gguf.Keys.General.FILE_TYPE else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        shape = tuple(int(d) for d in reversed(t.shape))
        writer.add_tensor(t.name, data.astype(np.float32).reshape(shape) if data.dtype == np.float16 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="session")
def shipped_f32(shipped, tmp_path_factory) -> Shipped:
    """The shipped model's F16 files widened to F32, for parity tests."""
    out = tmp_path_factory.mktemp("shipped-f32")
    return Shipped(as_f32(shipped.gguf, out / "text-f32.gguf"), as_f32(shipped.mmproj, out / "mmproj-f32.gguf"),
                   shipped.questions)


def pytest_collection_modifyitems(config, items):
    """A test that needs a model trained here (the `trained` fixture, ~2 minutes to build) is slow."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def families(tmp_path_factory, shapes_texts):
    """name -> FamilyFixture: a tiny random checkpoint and its F32 GGUF pair for each family in tests/families.py."""
    from families import FAMILIES, build

    root = tmp_path_factory.mktemp("families")
    return {name: build(name, shapes_texts, root) for name in FAMILIES}


@dataclass
class Trained:
    data: Path  # shapes dataset the model was trained on
    hf: Path  # OUT/final
    run: Path  # the training run folder
    gguf: Path  # F32 text model
    mmproj: Path  # F32 projector


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    from llavao1_data.shapes import ShapesConfig, write_dataset
    from llavao1_export.gguf_convert import convert_to_gguf
    from llavao1_train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    write_dataset(ShapesConfig(n=12, seed=2, kinds=("cot", "judge"), families=("count_color", "attribute", "compare")),
                  data, progress=False)
    final = train(TrainConfig(data=str(data), out=str(root / "run"), init="test-tiny", max_steps=240, lr=3e-3,
                              batch_size=8, max_length=1024, log_every=50, device="cpu", progress=False))
    res = convert_to_gguf(final, root / "gguf", "f32")
    return Trained(data, final, root / "run", res.text, res.mmproj)
