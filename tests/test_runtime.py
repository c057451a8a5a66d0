"""The runtime on the shipped model (its F16 files): invariants, streaming, hostile inputs, API, CLI."""

import io
import itertools
import json
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from llavao1_data.records import read_records
from llavao1_edge import api, cli
from llavao1_edge.engine import Engine, EngineConfig, EngineError
from llavao1_edge.images import ImageError, load_image
from llavao1_edge.judge import parse_pairwise_verdict
from llavao1_edge.modelfile import ModelFileError
from llavao1_edge.search import SearchConfig, run_search, search_events
from llavao1_edge.stages import STAGE_NAMES
from llavao1_train.specs import get_spec


@pytest.fixture(scope="module")
def questions(shipped):
    return shipped.questions


@pytest.fixture(scope="module")
def reasoner(shipped):
    with api.Reasoner(shipped.gguf, shipped.mmproj, n_threads=2) as r:
        yield r


def _chosen_tokens(result):
    return [t for s in result.steps for t in s.candidates[s.chosen].tokens]


def test_stage_search_with_one_candidate_is_exactly_greedy(reasoner, questions):
    for image, q, _ in questions[:6]:
        g = reasoner.ask(image, q, strategy="greedy")
        s = reasoner.ask(image, q, strategy="stage", candidates=1)
        assert _chosen_tokens(s) == _chosen_tokens(g)
        assert s.text == g.text and s.stages == g.stages
        assert g.tokens["decode_steps"] == g.tokens["generated"]  # one sequence: one token per llama_decode


def test_greedy_candidate_is_greedy_decoding(reasoner, questions):
    for image, q, _ in questions[:3]:
        g = reasoner.ask(image, q, strategy="greedy")
        b = reasoner.ask(image, q, strategy="best-of-n", candidates=3, selector="logprob", greedy_candidate=True)
        assert b.steps[0].candidates[0].text == g.text  # the whole answer, token for token
        s = reasoner.ask(image, q, strategy="stage", candidates=3, selector="logprob", greedy_candidate=True)
        summary = s.steps[0].candidates[0]
        assert summary.tokens == g.steps[0].candidates[0].tokens[:len(summary.tokens)]  # greedy's first stage
        assert summary.text.strip() and summary.finish == "closed"


def test_judging_both_orders_asks_every_pair_swapped(reasoner, questions):
    image, q, _ = questions[0]
    one = reasoner.ask(image, q, strategy="best-of-n", candidates=4, temperature=1.5, seed=3, selector="judge")
    both = reasoner.ask(image, q, strategy="best-of-n", candidates=4, temperature=1.5, seed=3, selector="judge",
                        judge_both_orders=True)
    assert [c.text for c in one.steps[0].candidates] == [c.text for c in both.steps[0].candidates]
    judged = both.steps[0].judgements
    assert judged and all(" | swapped: " in j.verdict and j.winner in (j.first, j.second) for j in judged)
    assert both.tokens["judge_prompt"] > 1.5 * one.tokens["judge_prompt"]  # twice the prompts, shared preamble
    assert one.tokens["judge_prompt_answer"] == one.tokens["judge_prompt"] > 0  # best-of-N judges whole answers
    for j in judged:  # a verdict that holds in both orders stands; a split one goes to the likelier candidate
        first, swapped = (parse_pairwise_verdict(v) for v in j.verdict.split(" | swapped: "))
        won, won_swapped = (j.first if first == 1 else j.second), (j.second if swapped == 1 else j.first)
        if won == won_swapped:  # unparsed verdicts: the response in second position wins (the paper's rule)
            assert j.winner == won
        else:
            cands = both.steps[0].candidates
            assert j.winner == max((j.first, j.second), key=lambda i: cands[i].mean_logprob)


def test_shipped_model_answers_in_four_stages(reasoner, questions):
    results = [reasoner.ask(img, q, strategy="greedy") for img, q, _ in questions]
    formed = sum(r.parsed.well_formed for r in results)
    correct = sum(r.answer == want for r, (_, _, want) in zip(results, questions, strict=True))
    assert formed >= len(results) // 2, [r.parsed.issues for r in results]
    assert correct >= len(results) // 3  # memorised training questions; the bar is low on purpose


def test_forked_prefix_logits_equal_a_fresh_evaluation(shipped_f32, questions):
    image, q, _ = questions[0]
    cfg = EngineConfig(n_ctx=1024, n_seq_max=4, n_threads=2, kv_f32=True, flash_attn=False)
    text = f"<|user|>\n<__media__>\n{q}<|end|>\n<|assistant|>\n"
    with Engine(shipped_f32.gguf, shipped_f32.mmproj, cfg) as e:
        state, _ = e.eval_prompt(e.prepare(text, image))
        e.fork(0, 2)
        forked = e.decode_tokens(2, [7, 8, 9], state.pos)
    with Engine(shipped_f32.gguf, shipped_f32.mmproj, cfg) as fresh:
        state2, _ = fresh.eval_prompt(fresh.prepare(text, image))
        direct = fresh.decode_tokens(0, [7, 8, 9], state2.pos)
    print("max |forked - fresh|", np.abs(forked - direct).max())
    assert np.abs(forked - direct).max() < 1e-5


def test_cached_image_equals_fresh_encode_and_skips_the_encoder(shipped_f32, questions):
    image, q, _ = questions[1]
    cfg = EngineConfig(n_ctx=1024, n_seq_max=2, n_threads=2, kv_f32=True, flash_attn=False)
    with Engine(shipped_f32.gguf, shipped_f32.mmproj, cfg) as e:
        first, s1 = e.eval_prompt(e.prepare(f"<|user|>\n<__media__>\n{q}<|end|>\n<|assistant|>\n", image))
        other = "How many objects are there?"
        second, s2 = e.eval_prompt(e.prepare(f"<|user|>\n<__media__>\n{other}<|end|>\n<|assistant|>\n", image))
        assert s1.image_encode_s > 0 and not s1.image_cache_hit
        assert s2.tokens_reused >= 16 and s2.image_encode_s == 0  # header + image come from the KV cache
        e.forget_seq0()  # force a re-decode of the image from cached embeddings
        third, s3 = e.eval_prompt(e.prepare(f"<|user|>\n<__media__>\n{other}<|end|>\n<|assistant|>\n", image))
        assert s3.image_cache_hit and s3.image_encode_s == 0
    with Engine(shipped_f32.gguf, shipped_f32.mmproj, cfg) as fresh:
        ref, _ = fresh.eval_prompt(fresh.prepare(f"<|user|>\n<__media__>\n{other}<|end|>\n<|assistant|>\n", image))
    assert np.abs(second.logits - ref.logits).max() < 1e-5
    assert np.abs(third.logits - ref.logits).max() < 1e-5


def test_follow_up_question_reuses_the_prompt_prefix_after_a_search(shipped, questions):
    image, q, _ = questions[2]
    other = "How many objects are there?"
    opts = dict(n_threads=2, kv_f32=True, flash_attn=False)
    with api.Reasoner(shipped.gguf, shipped.mmproj, **opts) as r:
        r.ask(image, q, strategy="stage", candidates=2, selector="judge")  # leaves generated text and judge prompts behind
        events = list(r.stream(image, other, strategy="greedy"))
        again = list(r.stream(image, other, strategy="greedy"))
    ready = next(ev for ev in events if ev.kind == "prompt_ready").data
    n_image = get_spec("test-tiny").image_tokens
    assert ready["tokens_reused"] >= n_image and ready["image_encode_s"] == 0  # header + image from the KV cache
    assert next(ev for ev in again if ev.kind == "prompt_ready").data["tokens_evaluated"] == 0
    with api.Reasoner(shipped.gguf, shipped.mmproj, **opts) as fresh:
        ref = fresh.ask(image, other, strategy="greedy")
    assert events[-1].data["result"].text == ref.text == again[-1].data["result"].text


def test_preprocessing_equals_mtmd_for_any_aspect_ratio(shipped):
    """Our fit_to_square (used for training) gives the pixels mtmd makes from the original image."""
    from llavao1_edge.images import fit_to_square

    rng = np.random.default_rng(0)
    size = get_spec("shapes-tiny").image_size
    with Engine(shipped.gguf, shipped.mmproj, EngineConfig(n_threads=2)) as e:
        def embeddings(img):
            p = e.prepare(f"<|user|>\n{e.marker}\nhi<|end|>\n<|assistant|>\n", img)
            try:
                return np.concatenate(e.image_embeddings(p))
            finally:
                e.free_prompt(p)
                e.clear_caches()

        for w, h in [(90, 40), (40, 90), (33, 100), (100, 33), (37, 111), (50, 50), (20, 70), (10, 20), (20, 10), (7, 13)]:
            img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            diff = np.abs(embeddings(img) - embeddings(fit_to_square(img, size))).max()
            print(f"{w}x{h}: max |mtmd - ours| {diff:.2e}")
            assert diff == 0.0, (w, h)


def test_stream_events_reassemble_into_the_result(reasoner, questions):
    image, q, _ = questions[2]
    events = list(reasoner.stream(image, q, strategy="stage", candidates=3, selector="judge", seed=5))
    result = events[-1].data["result"]
    assert events[-1].kind == "done"
    tokens: dict = {}
    rebuilt = ""
    for ev in events:
        if ev.kind == "token":
            tokens.setdefault((ev.stage, ev.candidate), []).append(ev.text)
        elif ev.kind == "forced":
            rebuilt += ev.text
        elif ev.kind == "stage_chosen":
            assert "".join(tokens.get((ev.stage, ev.candidate), [])) == ev.text
            rebuilt += ev.text
            tokens = {k: v for k, v in tokens.items() if k[0] != ev.stage}
    rebuilt += "".join(t for (stage, _), ts in tokens.items() if stage == "trailer" for t in ts)
    assert rebuilt == result.text
    kinds = {ev.kind for ev in events}
    assert {"prompt_ready", "stage_started", "token", "candidate_finished", "stage_chosen", "done"} <= kinds


def test_stage_search_judges_and_records_everything(reasoner, questions):
    image, q, _ = questions[0]
    r = reasoner.ask(image, q, strategy="stage", candidates=4, selector="judge", seed=1)
    assert [s.unit for s in r.steps][:4] == list(STAGE_NAMES)
    assert all(len(s.candidates) == 4 for s in r.steps[:4])
    made = [j for s in r.steps for j in s.judgements]
    assert all(j.winner in (j.first, j.second) for j in made)
    doc = json.loads(json.dumps(r.to_json()))
    assert set(doc["stages"]) == set(STAGE_NAMES) and "answer" in doc
    assert doc["timings"]["total_s"] > 0 and doc["tokens"]["prompt"] > 0
    assert doc["tokens"]["decode_steps"] <= doc["tokens"]["generated"] <= 4 * doc["tokens"]["decode_steps"]
    checked = [c.check for s in r.steps if s.unit == "reasoning" for c in s.candidates if c.check is not None]
    texts = {c.unit_text for s in r.steps if s.unit == "reasoning" for c in s.candidates}
    assert checked or len(texts) == 1  # identical candidates need no judging
    by_unit = {k.removeprefix("judge_prompt_"): v for k, v in doc["tokens"].items() if k.startswith("judge_prompt_")}
    assert sum(by_unit.values()) == doc["tokens"].get("judge_prompt", 0)  # every judge prompt token, labelled
    assert set(by_unit) == {s.unit for s in r.steps if s.judgements} | ({"check"} if checked else set())


def test_seeds_make_runs_reproducible(reasoner, questions):
    image, q, _ = questions[3]
    a = reasoner.ask(image, q, strategy="stage", candidates=3, seed=7)
    b = reasoner.ask(image, q, strategy="stage", candidates=3, seed=7)
    assert a.text == b.text
    assert [c.text for s in a.steps for c in s.candidates] == [c.text for s in b.steps for c in s.candidates]


@pytest.mark.parametrize(("strategy", "selector"), [("best-of-n", "judge"), ("best-of-n", "vote"),
                                                   ("stage", "logprob"), ("stage", "vote"), ("sentence", "logprob")])
def test_other_strategies_and_selectors(reasoner, questions, strategy, selector):
    image, q, _ = questions[4]
    r = reasoner.ask(image, q, strategy=strategy, selector=selector, candidates=3, max_answer_tokens=400)
    assert r.text and r.steps
    assert all(len(s.candidates) == 3 for s in r.steps if s.unit != "trailer")
    if selector != "judge":
        assert not any(s.judgements for s in r.steps)


def test_forced_format_for_models_without_stage_metadata(reasoner, questions):
    image, q, _ = questions[0]
    r = reasoner.ask(image, q, strategy="greedy", force_format=True, max_stage_tokens=60)
    assert r.text.startswith("<SUMMARY>")
    assert [s.forced for s in r.steps[:2]] == ["<SUMMARY>", "\n\n<CAPTION>"]


def test_cancellation_and_timeout(reasoner, questions):
    image, q, _ = questions[0]
    seen = []

    def cancel_after_tokens():
        return len(seen) >= 5

    r = reasoner.ask(image, q, strategy="stage", candidates=2, on_event=seen.append, cancel=cancel_after_tokens)
    assert "cancelled" in r.flags
    stop = threading.Event()
    stop.set()
    assert "cancelled" in reasoner.ask(image, q, strategy="greedy", cancel=stop).flags
    assert "timeout" in reasoner.ask(image, q, strategy="stage", candidates=4, timeout_s=1e-6).flags
    # the model is usable after a cancelled run
    assert reasoner.ask(image, q, strategy="greedy").text


def test_threads_are_serialised(reasoner, questions):
    image, q, _ = questions[5]
    want = reasoner.ask(image, q, strategy="stage", candidates=2, seed=3).text
    got = [None] * 3

    def worker(i):
        got[i] = reasoner.ask(image, q, strategy="stage", candidates=2, seed=3).text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 3


def test_close_frees_and_refuses_further_use(shipped, questions):
    r = api.Reasoner(shipped.gguf, shipped.mmproj, n_threads=2)
    engine = r.engine
    r.close()
    r.close()  # twice is fine
    with pytest.raises(EngineError, match="closed"):
        r.ask(questions[0][0], "How many?")
    for call in (lambda: engine.tokenize("hi"), lambda: engine.is_eog(1), lambda: engine.piece(5),
                 lambda: engine.step([(0, 1, 0)])):
        with pytest.raises(EngineError, match="closed"):  # never a native crash after close()
            call()


# --------------------------------------------------------------------------------------------
# Hostile inputs: clear errors, never a crash.


def test_bad_model_files(shipped, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        Engine(not_gguf, shipped.mmproj)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(shipped.gguf.read_bytes()[: shipped.gguf.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        Engine(truncated, shipped.mmproj)
    with pytest.raises(ModelFileError, match="file not found"):
        Engine(tmp_path / "missing.gguf", shipped.mmproj)
    with pytest.raises(ModelFileError, match="vision projector .* not a text model"):
        Engine(shipped.mmproj, shipped.mmproj)
    with pytest.raises(ModelFileError, match="not a vision projector"):
        Engine(shipped.gguf, shipped.gguf)


def test_projector_from_another_model_is_refused(shipped, make_checkpoint, tmp_path):
    from llavao1_export.gguf_convert import convert_to_gguf

    other = convert_to_gguf(make_checkpoint("wide", text_width=512, text_heads=4, text_ffn=512), tmp_path, "f16")
    with pytest.raises(ModelFileError, match="projector output width 512 does not match the text model's width 256"):
        Engine(shipped.gguf, other.mmproj)


def test_image_inputs(tmp_path):
    base = Image.new("RGB", (20, 10), (200, 10, 10))
    for mode in ("P", "RGBA", "L", "CMYK", "1", "LA", "I;16", "F"):
        img = load_image(base.convert(mode) if mode != "I;16" else Image.new("I;16", (20, 10), 40000))
        assert img.mode == "RGB" and img.size == (20, 10)
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (200, 10, 10)
    # EXIF orientation 6 (rotate 90) is applied
    exif = Image.Exif()
    exif[0x0112] = 6
    jpg = tmp_path / "rot.jpg"
    base.save(jpg, exif=exif.tobytes())
    assert load_image(jpg).size == (10, 20)
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 M pixels, a few KB on disk
    with pytest.raises(ImageError, match="over the limit"):
        load_image(bomb)


def test_search_config_errors(reasoner, questions):
    image, q, _ = questions[0]
    with pytest.raises(ValueError, match="strategy must be one of"):
        reasoner.ask(image, q, strategy="beam")
    with pytest.raises(ValueError, match="candidates must be in"):
        reasoner.ask(image, q, candidates=0)
    with pytest.raises(ValueError, match="question is empty"):
        reasoner.ask(image, "  ")
    with pytest.raises(TypeError, match="unknown search settings: colour"):
        reasoner.ask(image, q, colour="red")


def test_engine_search_without_api(shipped, questions):
    image, q, _ = questions[0]
    with Engine(shipped.gguf, shipped.mmproj, EngineConfig(n_threads=2)) as e:
        kinds = [ev.kind for ev in search_events(e, image, q, SearchConfig(strategy="greedy"))]
        r = run_search(e, image, q, SearchConfig(strategy="greedy"))
    assert kinds[0] == "prompt_ready" and kinds[-1] == "done" and r.text


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_run_json(shipped, questions, capsys):
    image, q, _ = questions[0]
    rc = cli.main(["run", str(image), q, "--model", str(shipped.gguf), "--mmproj", str(shipped.mmproj),
                   "--search", "stage", "-n", "2", "--json", "--threads", "2"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["stages"]) == {"summary", "caption", "reasoning", "conclusion"} and "answer" in doc


def test_cli_run_text_streams_stages(shipped, questions, capsys):
    image, q, _ = questions[0]
    assert cli.main(["run", str(image), q, "--model", str(shipped.gguf), "--mmproj", str(shipped.mmproj),
                     "-n", "2", "-v", "--threads", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].startswith("SUMMARY") and "answer:" in out
    assert "[summary #0]" in err and "time " in err


def test_cli_errors(shipped, tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "none.png"), "q", "--model", str(shipped.gguf),
                     "--mmproj", str(shipped.mmproj)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llavao1-edge: ") and "file not found" in err and err.count("\n") == 1
    assert cli.main(["run", "x.png", "q", "--model", str(shipped.gguf)]) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "x.png"])
    assert e.value.code == 2
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    assert cli.main(["info", str(bad)]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err
    assert cli.main(["run", "x.png", "q", "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["search"]["strategy"] == "stage" and resolved["engine"]["flash_attn"] is None
    assert resolved["search"]["reasoning_check"] is True
    assert cli.main(["run", "x.png", "q", "--no-reasoning-check", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["search"]["reasoning_check"] is False
    assert cli.main(["run", "x.png", "q", "--flash-attn", "off", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"]["flash_attn"] is False


def test_runtime_import_stays_light():
    import subprocess

    code = ("import sys, llavao1_edge, llavao1_edge.cli, llavao1_edge.api, llavao1_edge.search; "
            "print([m for m in ('torch', 'transformers', 'peft', 'onnx', 'llavao1_train', 'llavao1_export', "
            "'gguf', 'yaml', 'PIL.ImageOps') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # gguf's names come from its constants module alone (gguf_constants.py)


def test_gguf_names_are_gguf_s_own_objects_whichever_is_imported_first():
    import subprocess

    for first, then in (("llavao1_edge.gguf_keys", "gguf"), ("gguf", "llavao1_edge.gguf_keys")):
        code = (f"import {first}, {then}, gguf, llavao1_edge.gguf_constants as c, gguf.gguf_writer as w; "
                "from gguf import constants; "
                "assert gguf.Keys is c.Keys and w.GGUFValueType is c.GGUFValueType and constants is c._C; "
                "print('ok')")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.stdout.strip() == "ok", out.stderr


def test_closed_output_pipe_ends_quietly():
    import subprocess

    shipped = next(api.MODELS_DIR.glob("*/*.gguf"))
    proc = subprocess.Popen([sys.executable, "-m", "llavao1_edge.cli", "info", str(shipped)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written, as with `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


def test_shipped_model_answers_a_shipped_example(capsys):
    from llavao1_edge.api import MODELS_DIR, shipped_model_paths

    text, proj = shipped_model_paths()
    assert "f16" not in text.name.lower() and proj.name.startswith("mmproj")  # the quantized file, not its F16 source
    assert len(list(text.parent.glob("shapes-tiny-*.gguf"))) == 2  # that file and its F16 source, nothing stale
    examples = MODELS_DIR.parent / "examples"
    rec = next(iter(read_records(examples / "questions.jsonl")))
    assert cli.main(["run", str(examples / rec.image), rec.question, "--search", "greedy", "--json",
                     "--threads", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(doc["stages"][k] for k in STAGE_NAMES)  # the default model writes all four stages


def test_forked_prompts_sharing_text_equal_separate_evaluation(shipped_f32, questions):
    image, q, _ = questions[0]
    cfg = EngineConfig(n_ctx=2048, n_seq_max=6, n_threads=2, kv_f32=True, flash_attn=False)
    head = "<|user|>\n<__media__>\nAct as a judge. Compare the two answers to the question below carefully. "
    texts = [head + f"Response 1: {a}\nResponse 2: {b}<|end|>\n<|assistant|>\n"
             for a, b in (("two", "three"), ("red", "blue"), ("yes", "no"))]
    with Engine(shipped_f32.gguf, shipped_f32.mmproj, cfg) as e:
        e.eval_prompt(e.prepare(f"<|user|>\n<__media__>\n{q}<|end|>\n<|assistant|>\n", image))
        shared, stats = e.eval_forked([e.prepare(t, image) for t in texts], [1, 2, 3])
        n_text = sum(len(e.tokenize(t)) for t in texts)
        separate = []
        for t in texts:
            e.eval_prompt(e.prepare(f"<|user|>\n<__media__>\n{q}<|end|>\n<|assistant|>\n", image))
            (st,), _ = e.eval_forked([e.prepare(t, image)], [1])
            separate.append(st)
    assert stats.tokens_evaluated < n_text - 20  # the common text ran once
    for a, b in zip(shared, separate, strict=True):
        assert a.pos == b.pos and np.abs(a.logits - b.logits).max() < 1e-5


def test_prompts_starting_like_a_held_sequence_equal_separate_evaluation(shipped_f32, questions):
    """A knockout's next round forks what it shares with the round before from that round's kept
    sequence (not only from sequence 0): same logits, fewer tokens evaluated."""
    image, q, _ = questions[0]
    cfg = EngineConfig(n_ctx=2048, n_seq_max=6, n_threads=2, kv_f32=True, flash_attn=False)
    main = f"<|user|>\n<__media__>\n{q}<|end|>\n<|assistant|>\n"
    head = "<|user|>\n<__media__>\nAct as a judge. Compare the two answers to the question below carefully. "
    first, then = (head + f"Response 1: {a}\nResponse 2: {b}<|end|>\n<|assistant|>\n"
                   for a, b in (("two red circles", "three"), ("two red circles", "four blue squares")))
    with Engine(shipped_f32.gguf, shipped_f32.mmproj, cfg) as e:
        e.eval_prompt(e.prepare(main, image))
        held = e.prepare(first, image)
        (st,), _ = e.eval_forked([held], [1])
        e.step([(1, 7, st.pos)])  # a verdict decoded after the held prompt must not leak into the reuse
        (reused,), stats = e.eval_forked([e.prepare(then, image)], [2], held={1: held.keys})
        with pytest.raises(ValueError, match="held sequence"):
            e.eval_forked([e.prepare(then, image)], [1], held={1: held.keys})
        e.eval_prompt(e.prepare(main, image))
        (separate,), fresh = e.eval_forked([e.prepare(then, image)], [3])
    print("max |reused - separate|", np.abs(reused.logits - separate.logits).max(),
          "tokens", stats.tokens_evaluated, "vs", fresh.tokens_evaluated)
    assert stats.tokens_evaluated < fresh.tokens_evaluated - 20
    assert reused.pos == separate.pos and np.abs(reused.logits - separate.logits).max() < 1e-5


def test_judge_batches_fit_the_kv_cache_and_give_the_verdicts_of_a_large_one():
    """Judge prompts are batched by the KV cells left beside the candidates, not only by free
    sequences: a small cache gives the verdicts of a large one, and where a prompt cannot fit at
    all the likelier candidate goes on with a flag (no llama_decode failure)."""
    from llavao1_edge.api import MODELS_DIR

    examples = MODELS_DIR.parent / "examples"
    recs = [r for r in read_records(examples / "questions.jsonl")][5:7]  # walk-length reasoning stages
    # sampled hot, so the candidates differ and long REASONING texts get judged (at 0.6 the model mostly
    # samples one text, and identical candidates are not judged)
    settings = dict(strategy="stage", candidates=4, selector="judge", judge_both_orders=True, greedy_candidate=True, seed=1,
                    temperature=1.5)

    def run(n_ctx):
        with api.Reasoner(n_threads=2, n_ctx=n_ctx, kv_f32=True, flash_attn=False) as r:
            return [r.ask(examples / rec.image, rec.question, **settings) for rec in recs]

    def judged(res):
        return [(j.first, j.second, j.winner, j.verdict) for s in res.steps for j in s.judgements]

    large, small, tiny = run(8192), run(1536), run(832)  # 1536 overflowed when batches ignored cells
    for a, b in zip(large, small, strict=True):
        assert judged(a) and judged(a) == judged(b) and a.text == b.text and not b.flags
    not_judged = [(s, j) for res in tiny for s in res.steps for j in s.judgements if j.verdict.startswith("(not judged")]
    assert not_judged and any("did not fit in the KV cache" in f for res in tiny for f in res.flags)
    for s, j in not_judged:
        assert j.winner == max((j.first, j.second), key=lambda i: s.candidates[i].mean_logprob)
        assert not j.parsed


def test_candidates_sampled_together_equal_each_sampled_alone(shipped_f32, questions):
    """The fast path (candidates share one row, one distribution and one text state while they agree)
    against the reference: each candidate decoded alone, one token per llama_decode, with its own stream."""
    from llavao1_edge.sampling import choose
    from llavao1_edge.search import candidate_rng

    image, q, _ = questions[1]
    cfg = SearchConfig(strategy="stage", candidates=4, selector="logprob", temperature=2.5, seed=3)
    reasoner = api.Reasoner(shipped_f32.gguf, shipped_f32.mmproj, n_threads=2, kv_f32=True, flash_attn=False)
    cands = reasoner.ask(image, q, cfg).steps[0].candidates
    assert len({tuple(c.tokens) for c in cands}) > 1  # they diverged: rows were forked mid-stage
    e = reasoner.engine
    prompt = e.prepare(e.template.user_turn(q, e.marker), image)
    state, _ = e.eval_prompt(prompt)
    e.free_prompt(prompt)
    for c in cands:
        rng = candidate_rng(cfg.seed, ("stage", 0), c.index)
        e.drop(1)
        e.fork(0, 1)
        logits, tokens, logprob = state.logits, [], 0.0
        for pos in range(state.pos, state.pos + len(c.tokens)):
            tok, lp = choose(logits, rng, cfg.temperature, cfg.top_p)
            tokens.append(tok)
            logprob += lp
            logits = e.decode_tokens(1, [tok], pos)
        assert tokens == c.tokens
        print(f"candidate {c.index}: {len(tokens)} tokens, |logprob sum - alone| {abs(logprob - c.logprob_sum):.2e}")
        assert logprob == pytest.approx(c.logprob_sum, abs=1e-3)  # rows batched with others: float rounding only
        assert c.text == e.detokenize(tokens)  # one text state per branch, fed once per token
    e.drop(1)
    reasoner.close()


def test_token_distribution_draws_equal_a_plain_nucleus_sampler():
    """The prepared distribution (top-k first, cached nucleus, bisect draws) against the textbook sampler:
    softmax at the temperature, full sort, smallest set with mass >= top_p, inverse-CDF draw."""
    from llavao1_edge.sampling import TokenDistribution

    spread = np.random.default_rng(0).normal(0, 3, 728).astype(np.float32)
    confident = spread.copy()
    confident[5] += 14  # one token holds > 0.9 of the mass at 0.6: the one-token nucleus path
    # 4.0: a flat distribution, the nucleus outgrows the first top-k
    for logits, temperature, top_p in itertools.product((spread, confident), (0.6, 1.5, 4.0), (0.5, 0.9, 1.0)):
        p = np.exp((logits - logits.max()).astype(np.float64) / temperature)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n = len(p) if top_p >= 1.0 else int(np.searchsorted(cum, top_p)) + 1
        dist = TokenDistribution(logits, temperature, top_p)  # one per row, drawn from by every candidate
        for k in range(50):
            u = np.random.default_rng(k).random() * cum[n - 1]
            expected = int(order[min(int(np.searchsorted(cum[:n], u, side="right")), n - 1)])
            tok, lp = dist.choose(np.random.default_rng(k))
            assert tok == expected
            log_softmax = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
            assert lp == pytest.approx(log_softmax[tok], abs=1e-5)  # the model's own, at temperature 1
    assert TokenDistribution(logits, 0.0, 0.9).choose(None)[0] == int(logits.argmax())


def test_verdict_drafts_propose_what_followed_the_longest_latest_match():
    from llavao1_edge.search import VerdictDrafts

    drafts = VerdictDrafts([[1, 2, 3, 4, 5]])
    drafts.add([9, 2, 3, 7, 8])  # most recent: looked at first
    assert drafts.propose([2, 3], 2) == [7, 8]  # the latest text with the suffix
    assert drafts.propose([1, 2, 3], 5) == [4, 5]  # a longer match wins over a more recent shorter one
    assert drafts.propose([5], 3) == []  # nothing followed it
    assert drafts.propose([6], 3) == [] and drafts.propose([2], 0) == []


def test_drafted_verdicts_equal_verdicts_decoded_one_token_a_step(monkeypatch):
    """Lookup decoding of greedy verdicts keeps only drafted tokens the model would choose itself:
    the same verdicts, winners and answers as one token a step, in fewer decode steps, whether the
    drafts are right (earlier verdicts) or go wrong halfway (each draft's second half replaced)."""
    from llavao1_edge.api import MODELS_DIR
    from llavao1_edge.search import VerdictDrafts

    examples = MODELS_DIR.parent / "examples"
    recs = list(read_records(examples / "questions.jsonl"))[:4]
    settings = dict(strategy="stage", candidates=4, selector="judge", seed=0)

    def judged(res):
        return [(j.first, j.second, j.winner, j.verdict) for s in res.steps for j in s.judgements]

    def counted(runs, key):
        return sum(res.tokens[key] for res in runs)

    propose = VerdictDrafts.propose

    def half_wrong(self, context, k):
        draft = propose(self, context, k)
        return draft[:len(draft) // 2] + [t + 1 for t in draft[len(draft) // 2:]]

    # the F16 file: multi-row kernels round differently from one-row steps, far less than on Q4_K_M
    folder = MODELS_DIR / api.DEFAULT_MODEL
    with api.Reasoner(folder / "shapes-tiny-f16.gguf", folder / "mmproj-shapes-tiny-f16.gguf", n_threads=2,
                      kv_f32=True, flash_attn=False) as r:
        def ask_all(**more):
            return [r.ask(examples / rec.image, rec.question, **settings, **more) for rec in recs]

        plain, drafted = ask_all(draft_verdicts=False), ask_all(draft_verdicts=True)
        monkeypatch.setattr(VerdictDrafts, "propose", half_wrong)
        wrong = ask_all(draft_verdicts=True)
    assert counted(plain, "judge_decode_steps") >= 4  # the runs judged something
    for runs in (drafted, wrong):
        for a, b in zip(plain, runs, strict=True):
            assert judged(a) == judged(b) and a.text == b.text
        assert counted(runs, "judge_decode_steps") < counted(plain, "judge_decode_steps")
    assert counted(drafted, "judge_draft_kept") > 0
    assert 0 < counted(wrong, "judge_draft_kept") < counted(wrong, "judge_drafted")  # rejections were exercised
