"""`llavao1-edge serve`: the real server process on a free port with the shipped model, called by the official
`openai` package, by plain HTTP for Ollama's API, by hostile requests, by eight clients at once, and by a
real browser (Debian's chromium) for the page."""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llavao1_edge.api import MODELS_DIR

EXAMPLES = MODELS_DIR.parent / "examples" / "images"
IMAGE = EXAMPLES / "eval-9001-000000.png"
QUESTION = "How many objects are there?"
KEY = "test-key"
ORIGIN = "http://allowed.example"


class Server:
    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "llavao1_edge.cli", "serve", "--port", "0", "--threads", "2", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split(" on ", 1)[1].split(" ", 1)[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep its pipe drained

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, parsed JSON or text) of one request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, dict(resp.getheaders()), json.loads(text)
        except ValueError:
            return resp.status, dict(resp.getheaders()), text

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "2", "--api-key", KEY, "--cors-origin", ORIGIN)
    yield s
    assert s.stop() == 0


def _data_uri(path: Path = IMAGE) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(question: str = QUESTION, image: Path | None = IMAGE) -> list:
    parts = [{"type": "text", "text": question}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": _data_uri(image)}})
    return [{"role": "user", "content": parts}]


def _run_json(*search: str) -> dict:
    """What `llavao1-edge run --json` answers, with the server's per-worker thread count."""
    out = subprocess.run([sys.executable, "-m", "llavao1_edge.cli", "run", str(IMAGE), QUESTION, "--json",
                          "--threads", "1", *search], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("search", [["greedy"], ["stage", "2", "logprob"]])
def test_openai_client_gets_the_answer_run_gives(server, search):
    from openai import OpenAI

    spec = {"strategy": search[0], **({"candidates": int(search[1]), "selector": search[2]} if len(search) > 1 else {})}
    flags = ["--search", search[0]] + (["-n", search[1], "--selector", search[2]] if len(search) > 1 else [])
    want = _run_json(*flags, "--seed", "3")
    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    resp = client.chat.completions.create(model="shapes-tiny", messages=_messages(), seed=3,
                                          extra_body={"llavao1": spec})
    msg = resp.choices[0].message
    assert msg.content == want["answer"] and resp.choices[0].finish_reason == "stop"
    extra = msg.model_extra
    assert extra["reasoning_content"] == extra["reasoning"]
    assert extra["reasoning_content"].startswith("<SUMMARY>") and extra["reasoning_content"].endswith("</REASONING>")
    trace = resp.model_extra["llavao1"]
    assert trace["text"] == want["text"] and [s["unit"] for s in trace["steps"][:4]] == [s["unit"] for s in want["steps"][:4]]
    assert resp.usage.prompt_tokens == want["tokens"]["prompt"]

    stream = client.chat.completions.create(model="shapes-tiny", messages=_messages(), seed=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"llavao1": spec})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(c.choices[0].index == 0 for c in chunks if c.choices)
    kinds = ["content" if d.content else "reasoning" if (d.model_extra or {}).get("reasoning_content") else None
             for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds == sorted(kinds, key=lambda k: k == "content") and "content" in kinds  # reasoning, then content
    assert not any(d.content and (d.model_extra or {}).get("reasoning_content") for d in deltas)  # never both
    assert "".join(d.content or "" for d in deltas) == want["answer"]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == extra["reasoning_content"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    if search[0] == "greedy":  # token by token, not one piece
        assert sum(1 for k in kinds if k == "reasoning") > 10


def test_search_events_stream_for_the_page(server):
    status, _, text = server.request("POST", "/v1/chat/completions", {
        "model": "shapes-tiny", "messages": _messages(), "stream": True,
        "llavao1": {"strategy": "stage", "candidates": 2, "selector": "judge", "events": True}}, AUTH)
    assert status == 200
    lines = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    events = [c["llavao1"]["event"] for c in lines if "event" in c.get("llavao1", {})]
    kinds = [e["kind"] for e in events]
    assert kinds.count("stage_chosen") == 4 and kinds.count("candidate_finished") == 8 and "judge_decision" in kinds
    assert text.rstrip().endswith("data: [DONE]") and lines[-1]["llavao1"]["timings"]["total_s"] > 0


def test_ollama_chat_streams_thinking_then_content(server):
    body = {"model": "shapes-tiny", "messages": [{"role": "user", "content": QUESTION,
                                                  "images": [base64.b64encode(IMAGE.read_bytes()).decode()]}],
            "options": {"seed": 3}}
    want = _run_json("--seed", "3")
    status, headers, text = server.request("POST", "/api/chat", body, AUTH)
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in text.splitlines()]
    thinking = [i for i, ln in enumerate(lines) if ln["message"].get("thinking")]
    content = [i for i, ln in enumerate(lines) if ln["message"]["content"]]
    assert thinking and content and max(thinking) < min(content)
    assert "".join(ln["message"]["content"] for ln in lines) == want["answer"]
    last = lines[-1]
    assert last["done"] is True and last["done_reason"] == "stop" and last["eval_count"] > 0
    assert last["total_duration"] > last["eval_duration"] > 0 and not any(ln["done"] for ln in lines[:-1])
    status, _, one = server.request("POST", "/api/chat", {**body, "stream": False, "think": False}, AUTH)
    assert status == 200 and one["message"]["content"] == want["answer"] and "thinking" not in one["message"]
    status, _, tags = server.request("GET", "/api/tags", headers=AUTH)
    assert tags["models"][0]["name"] == "shapes-tiny" and tags["models"][0]["details"]["format"] == "gguf"
    status, _, shown = server.request("POST", "/api/show", {"model": "shapes-tiny:latest"}, AUTH)
    assert status == 200 and "vision" in shown["capabilities"]
    assert server.request("POST", "/api/show", {"model": "llama3"}, AUTH)[0] == 404


BAD = [  # (what, method, path, body or raw bytes, extra headers, status, error code or message part)
    ("malformed JSON", "POST", "/v1/chat/completions", b"{not json", {}, 400, "not valid JSON"),
    ("no messages", "POST", "/v1/chat/completions", {"model": "shapes-tiny"}, {}, 400, "messages"),
    ("an extra field", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages(), "bogus": 1},
     {}, 400, "bogus"),
    ("bad base64", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, {"type": "text", "text": "hi"}]}]},
     {}, 400, "base64"),
    ("not an image", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}},
        {"type": "text", "text": "hi"}]}]}, {}, 400, "not a readable image"),
    ("a remote URL", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, {}, 400, "data: URIs"),
    ("a file URL", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, {}, 400, "data: URIs"),
    ("n=2", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages(), "n": 2}, {}, 400, "n must be 1"),
    ("tools", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages(), "tools": [{"type": "function"}]},
     {}, 400, "unsupported"),
    ("an unknown model", "POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": _messages()}, {}, 400,
     "model_not_found"),
    ("max_tokens too large", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages(),
                                                               "max_tokens": 10**6}, {}, 400, "max_tokens"),
    ("a bad search setting", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages(),
                                                               "llavao1": {"candidates": "four"}}, {}, 400, "candidates"),
    ("two images", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_uri()}}, {"type": "image_url", "image_url": {"url": _data_uri()}},
        {"type": "text", "text": "hi"}]}]}, {}, 400, "one image per request"),
    ("a huge question", "POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages("why " * 6000)},
     {}, 400, "no room for the answer"),
    ("a huge body", "POST", "/v1/chat/completions", b"x" * (33 * 2**20), {}, 413, "body_too_large"),
    ("an unknown path", "GET", "/v2/nothing", None, {}, 404, "not_found"),
    ("a wrong method", "GET", "/v1/chat/completions", None, {}, 405, "method_not_allowed"),
    ("a wrong key", "GET", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("no key", "GET", "/v1/models", None, {"Authorization": ""}, 401, "invalid_api_key"),
    ("a foreign Host", "GET", "/v1/models", None, {"Host": "attacker.example:8080"}, 403, "forbidden_host"),
    ("Ollama: bad image", "POST", "/api/chat", {"model": "shapes-tiny", "messages": [
        {"role": "user", "content": "hi", "images": ["%%%"]}]}, {}, 400, "base64"),
    ("Ollama: unknown model", "POST", "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
     {}, 404, "not found"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_hostile_requests_get_a_4xx_with_an_error_object_and_the_next_request_works(server, case):
    what, method, path, body, headers, status, expect = case
    raw = body if isinstance(body, bytes) else None
    got, _, doc = server.request(method, path, None if raw else body, {**AUTH, **headers}, raw=raw)
    assert got == status, doc
    if path.startswith("/api/"):
        assert isinstance(doc["error"], str) and expect in doc["error"]
    else:
        err = doc["error"]
        assert {"message", "type", "code"} <= set(err) and expect in (err["message"] + str(err["code"]))
        assert "Traceback" not in err["message"] and "\n" not in err["message"]
    ok, _, answer = server.request("POST", "/v1/chat/completions", {
        "model": "shapes-tiny", "messages": _messages(), "llavao1": {"strategy": "greedy"}, "max_tokens": 16}, AUTH)
    assert ok == 200 and answer["object"] == "chat.completion"


def test_health_and_the_page_need_no_key_and_cors_only_for_named_origins(server):
    assert server.request("GET", "/health")[0] == 200
    status, headers, page = server.request("GET", "/")
    assert status == 200 and "<title>llavao1-edge</title>" in page
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # self-contained: nothing from a CDN
    assert server.request("GET", "/examples")[0] == 200
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    status, headers, _ = server.request("OPTIONS", "/v1/chat/completions", headers=pre)
    assert status == 200 and headers.get("access-control-allow-origin") == ORIGIN
    _, headers, _ = server.request("GET", "/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}
    _, headers, _ = server.request("GET", "/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert headers.get("access-control-allow-origin") == ORIGIN


def test_eight_concurrent_clients_get_the_answer_one_gets_alone(server):
    body = {"model": "shapes-tiny", "messages": _messages(), "llavao1": {"strategy": "greedy"}}
    _, _, alone = server.request("POST", "/v1/chat/completions", body, AUTH)
    answers = [None] * 8

    def ask(i):
        answers[i] = server.request("POST", "/v1/chat/completions", body, AUTH)[2]["llavao1"]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [alone["llavao1"]["text"]] * 8


def _open_stream(port: int, budget: int):
    """A long streamed search (every stage runs to its budget), its connection and its first bytes read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": "shapes-tiny", "messages": _messages(), "stream": True, "max_tokens": budget,
            "temperature": 2.0, "top_p": 1.0,  # rambling candidates: each stage runs long
            "llavao1": {"strategy": "stage", "candidates": 4, "selector": "judge", "force_format": True}}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read1(64)
    return conn, resp


def test_a_full_server_answers_503_and_a_client_that_leaves_frees_its_slot():
    s = Server("--parallel", "1", "--queue", "0", "--threads", "1")
    try:
        conn, _ = _open_stream(s.port, 4000)
        status, headers, doc = s.request("POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages()})
        assert status == 503 and headers["retry-after"] == "5" and doc["error"]["code"] == "server_busy"
        conn.sock.shutdown(2)  # the client leaves mid-stream
        conn.close()
        deadline = time.time() + 20
        while s.request("GET", "/health")[2]["busy"] and time.time() < deadline:
            time.sleep(0.05)
        assert s.request("GET", "/health")[2]["busy"] == 0  # its search was cancelled, not run to the end
        status, _, doc = s.request("POST", "/v1/chat/completions", {"model": "shapes-tiny", "messages": _messages(),
                                                                    "llavao1": {"strategy": "greedy"}})
        assert status == 200
        conn, resp = _open_stream(s.port, 4000)  # SIGTERM with a search in flight: it ends, the process exits 0
        assert s.stop() == 0
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "stop"' in rest
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_serve_without_the_extra_says_which_to_install(monkeypatch, capsys):
    import importlib.util

    from llavao1_edge import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install 'llavao1-edge[server]'" in err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_the_page_shows_the_four_stages_in_a_real_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples img"))
        driver.find_element(By.CSS_SELECTOR, "#examples img").click()  # a shipped example image and its question
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "candidates").clear()
        driver.find_element(By.ID, "candidates").send_keys("2")
        Select(driver.find_element(By.ID, "selector")).select_by_value("judge")  # the paper's: verdicts shown
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "status").text in ("done",) or
                                         d.find_element(By.ID, "status").text.startswith("error"))
        assert driver.find_element(By.ID, "status").text == "done"
        for stage in ("summary", "caption", "reasoning", "conclusion"):
            box = driver.find_element(By.ID, f"stage-{stage}")
            assert box.find_element(By.CLASS_NAME, "text").text.strip(), stage
            assert len(box.find_elements(By.CSS_SELECTOR, ".cands li")) == 2  # both candidates shown
            assert len(box.find_elements(By.CSS_SELECTOR, ".cands li.chosen")) == 1  # the chosen one marked
        verdicts = " ".join(e.text for e in driver.find_elements(By.CLASS_NAME, "verdicts"))
        assert "judge: #" in verdicts and " → #" in verdicts  # where the candidates differ, the verdict shows
        assert "total" in driver.find_element(By.ID, "timings").text
        driver.save_screenshot(str(os.environ.get("LLAVAO1_PAGE_SCREENSHOT") or tmp_path / "page.png"))
    finally:
        driver.quit()


def test_streamed_pieces_add_up_to_the_whole_answer_however_the_tags_are_split():
    import random

    from llavao1_edge.server.stream import AnswerSplitter, answer_parts

    text = ("<SUMMARY> plan </SUMMARY>\n\n<CAPTION> a red circle </CAPTION>\n\n<REASONING> one, so 1 "
            "</REASONING>\n\n<CONCLUSION>  1  </CONCLUSION>\nafter")
    assert answer_parts(text) == (text.split("\n\n<CONCLUSION>")[0], "1")
    rng = random.Random(0)
    for _ in range(300):
        s, reasoning, content, i = AnswerSplitter(), "", "", 0
        while i < len(text):
            k = rng.randint(1, 6)
            r, c = s.feed(text[i:i + k])
            assert "<" not in c and not r.endswith("<") and not r.endswith("\n")  # no half tag, no held space
            reasoning, content, i = reasoning + r, content + c, i + k
        r, c = s.feed("", final=True)
        assert (reasoning + r, content + c) == answer_parts(text)
