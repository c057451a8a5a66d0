"""The runtime on every vision family llama.cpp runs, as tiny random-weight models (tests/families.py):
prompts through each family's own chat template, the four stages forced, sliced images encoded chunk by
chunk and proven against llama.cpp's own path."""

import json
import os

import numpy as np
import pytest
from families import FAMILIES, sample_image

from llavao1_edge import cli
from llavao1_edge.engine import Engine, EngineConfig, EngineError, ImageChunk
from llavao1_edge.prompting import ChatTemplate, TemplateError
from llavao1_edge.stages import STAGE_NAMES

QUESTION = "How many red circles are there?"
EXACT = EngineConfig(n_ctx=2048, n_seq_max=4, n_threads=2, kv_f32=True, flash_attn=False)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("search", [["--search", "greedy"], ["--search", "stage", "-n", "2", "--selector", "logprob"]])
def test_every_family_answers_in_four_stages_through_the_cli(families, name, search, tmp_path, capsys):
    fx = families[name]
    image = tmp_path / "image.png"
    sample_image().save(image)
    rc = cli.main(["run", str(image), QUESTION, "--model", str(fx.gguf), "--mmproj", str(fx.mmproj), *search,
                   "--max-stage-tokens", "6", "--threads", "2", "--ctx", "2048", "--json"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert [s["unit"] for s in doc["steps"][:4]] == list(STAGE_NAMES)  # every stage asked for, forced open
    assert doc["text"].count("<SUMMARY>") == 1 and doc["text"].count("</CONCLUSION>") == 1
    assert doc["tokens"]["prompt"] > 20


def test_templates_that_read_only_lists_get_parts_and_keep_the_marker_and_the_question(families):
    for name, form in (("smolvlm", "parts"), ("idefics3", "parts"), ("qwen2vl", "string"), ("gemma3", "string")):
        fx = families[name]
        with Engine(fx.gguf, fx.mmproj, EngineConfig(n_threads=2, n_ctx=1024)) as e:
            prompt = e.template.user_turn(QUESTION, e.marker)
            assert e.template.form == form, name
            assert e.marker in prompt and QUESTION in prompt
    smolvlm = ChatTemplate(open(families["smolvlm"].hf / "chat_template.jinja").read(), "smolvlm.gguf")
    assert smolvlm.user_turn("Q?", "<__media__>") == "<|im_start|>User: <__media__>Q?<end_of_utterance>\nAssistant:"
    drops = ChatTemplate("{% for m in messages %}{{ m['role'] }}{% endfor %}", "broken.gguf")
    with pytest.raises(TemplateError, match=r"broken.gguf: its chat template cannot carry this prompt .*the question"):
        drops.user_turn("Q?", "<__media__>")


def _chunks(e, prompt):
    return [c for c in prompt.chunks if isinstance(c, ImageChunk)]


def test_a_sliced_image_is_encoded_chunk_by_chunk_as_llama_cpp_does(families):
    """SmolVLM slices an image into tiles and an overview (five chunks here): each chunk gets its own
    embeddings (equal to mtmd encoding that chunk alone), and the prompt's first-token logits equal
    llama.cpp's own path (mtmd_helper_eval_chunks) on the same prompt."""
    fx = families["smolvlm"]
    image = sample_image(50, 30)
    with Engine(fx.gguf, fx.mmproj, EXACT) as e:
        text = e.template.user_turn(QUESTION, e.marker)
        prompt = e.prepare(text, image)
        chunks = _chunks(e, prompt)
        assert [c.index for c in chunks] == [0, 1, 2, 3, 4]  # 2x2 tiles, then the overview
        ours = e.image_embeddings(prompt)
        for c, emb in zip(chunks, ours, strict=True):  # the reference: mtmd encoding this chunk alone
            assert e._M.mtmd_encode_chunk(e._mctx, c.chunk) == 0
            alone = np.ctypeslib.as_array(e._M.mtmd_get_output_embd(e._mctx), shape=(c.n_tokens * e.n_embd,))
            assert np.abs(emb.reshape(-1) - alone).max() == 0.0
        assert min(np.abs(ours[0] - other).max() for other in ours[1:]) > 1e-3  # no chunk got the first's
        state, _ = e.eval_prompt(prompt)
        reference = e.helper_eval(text, image, seq=3)
        print("max |engine - mtmd_helper_eval_chunks| first-token logits:", np.abs(state.logits - reference).max())
        assert np.abs(state.logits - reference).max() < 1e-4
        e.free_prompt(prompt)


def test_the_bottom_right_of_a_sliced_image_changes_the_answer(families):
    """The regression: with every chunk encoded as the first, a change in the last tile changed nothing."""
    fx = families["smolvlm"]
    image = sample_image(50, 30)
    changed = image.copy()
    changed.paste((255, 255, 255), (36, 18, 50, 30))  # the bottom-right tile only
    with Engine(fx.gguf, fx.mmproj, EXACT) as e:
        text = e.template.user_turn(QUESTION, e.marker)
        a, _ = e.eval_prompt(e.prepare(text, image))
        b, _ = e.eval_prompt(e.prepare(text, changed))
    assert np.abs(a.logits - b.logits).max() > 1e-4


@pytest.mark.parametrize("name", ["qwen2vl", "qwen2.5vl", "gemma3", "idefics3", "llava-clip"])
def test_prompt_logits_equal_llama_cpps_own_path_for_each_family(families, name):
    """Positions as mtmd's helper computes them (M-RoPE for Qwen, non-causal image blocks for Gemma 3)."""
    fx = families[name]
    image = sample_image(56, 84)
    with Engine(fx.gguf, fx.mmproj, EXACT) as e:
        text = e.template.user_turn(QUESTION, e.marker)
        state, _ = e.eval_prompt(e.prepare(text, image))
        reference = e.helper_eval(text, image, seq=3)
        follow = e.decode_tokens(0, e.tokenize(" yes"), state.pos)  # text after the image continues at the right place
    assert np.abs(state.logits - reference).max() < 1e-4
    assert np.isfinite(follow).all()


def test_an_invalid_token_is_named_as_such(families):
    fx = families["llava-clip"]
    with Engine(fx.gguf, fx.mmproj, EXACT) as e:
        with pytest.raises(EngineError, match="invalid input batch .* outside the vocabulary"):
            e.step([(0, e.n_vocab + 5, 0)])


def test_info_names_the_family_and_how_an_image_becomes_tokens(families, capsys):
    fx = families["smolvlm"]
    assert cli.main(["info", str(fx.gguf), str(fx.mmproj)]) == 0
    out = capsys.readouterr().out
    assert "family        SmolVLM / Idefics3" in out and "tiles of 32 px" in out and "4 tokens each" in out
    assert "stage tags    several tokens each" in out
    assert cli.main(["info", str(families["qwen2vl"].mmproj), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "Qwen2-VL"


@pytest.mark.parametrize("name", ["smolvlm", "idefics3", "qwen2vl", "qwen2.5vl"])
def test_verify_holds_each_family_to_transformers(families, name):
    """Text logits ≤ 1e-4 and, chunk by chunk, image embeddings within the tower's tolerance, with the image
    prepared by mtmd's rule for the family (tiles and overview; dynamic size, letterboxed) on a non-square image."""
    from llavao1_export.verify import verify

    f = families[name]
    report = verify(f.hf, str(f.gguf), str(f.mmproj), threads=2)
    print(report.table())
    (path,) = report.paths
    assert path.tokens_match, path.notes
    assert path.checks == {"text_logits<=1e-4": True, "image_embd<=5e-3": True}
    assert path.text_top1_agreement == 1.0 and path.image_top1_agreement == 1.0
    assert path.image_max_abs_logit < 1e-2  # what the embedding gap becomes at the answer's first token


def test_verify_names_a_tokenizer_that_disagrees(families, tmp_path):
    """The check itself can fail: a GGUF from another tokenizer is reported, not passed."""
    import shutil

    from llavao1_export.verify import verify

    f = families["qwen2vl"]
    other = tmp_path / "other"
    shutil.copytree(f.hf, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    merges = tok["model"]["merges"]
    tok["model"]["merges"] = merges[len(merges) // 2:]  # a different split of the same text
    (other / "tokenizer.json").write_text(json.dumps(tok))
    report = verify(other, str(f.gguf), str(f.mmproj), threads=2)
    assert not report.passed and any("tokenization differs" in n for n in report.paths[0].notes)


def test_the_marker_verify_and_training_render_is_mtmds():
    import llama_cpp.mtmd_cpp as M

    from llavao1_edge.prompting import MEDIA_MARKER

    assert M.mtmd_default_marker().decode() == MEDIA_MARKER


LLAMA_CPP_SRC = os.environ.get("LLAMA_CPP_SRC")  # a llama.cpp source folder (.ci/run unpacks llama-cpp-python's sdist)


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_CPP_SRC, reason="set LLAMA_CPP_SRC to a llama.cpp source folder, e.g. from "
                    "`pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:` (.ci/run does)")
@pytest.mark.parametrize("name", ["smolvlm", "qwen2vl", "qwen2.5vl", "llava-clip"])
def test_our_pair_behaves_in_llama_cpp_as_its_own_converters_pair(families, name, tmp_path):
    from llavao1_export.crosscheck import crosscheck

    res = crosscheck(families[name].hf, LLAMA_CPP_SRC, tmp_path, threads=2)
    print(res.table())
    assert res.same_behaviour and res.behaviour["image_embd"] == 0.0
    assert all(v == 0.0 for v in res.tensor_max_abs.values()) and not any(res.tensors_differ.values())
    # the documented differences (docs/families.md), nothing else
    assert set(res.only_ours["text"]) <= {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                                          "qwen2vl.vocab_size"}
    expected = {"qwen2vl": {"clip.vision.feed_forward_length"}}.get(name, set())
    assert set(res.values_differ.get("mmproj", {})) == expected and not res.values_differ["text"]
