"""`llavao1-edge pull`, `run --hf`, `list`, `rm` and `Reasoner.from_hf` against a fake hub on 127.0.0.1.

The fake hub serves the two routes the client uses, the tree (file list) and `/{repo}/resolve/{rev}/{file}`
with `Range`, for repositories holding copies of the model the package ships under hub-style names. It
records every request and can cut a body short, stall it, corrupt it, ignore `Range`, redirect downloads
to another host (a CDN) or drop connections. Nothing here reaches the real hub.
"""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from llavao1_edge import api, cli, hub
from llavao1_edge.hub import HubError, ModelRef, RepoFile

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "test-org/ShapesTiny-GGUF"
TEXT, F16, MMPROJ = "ShapesTiny-Q4_K_M.gguf", "ShapesTiny-F16.gguf", "mmproj-ShapesTiny-F16.gguf"
IMAGE = api.MODELS_DIR.parent / "examples" / "images" / "eval-9001-000000.png"
QUESTION = "How many objects are there?"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]]  # repository -> file path -> bytes, in the order the tree lists them
    port: int = 0
    requests: list[dict] = field(default_factory=list)  # path, range, auth, host of each request
    cut_after: int | None = None  # the next body ends after this many bytes (the connection closes), once
    stall_after: int | None = None  # the next body stops after this many bytes until `release` is set, once
    corrupt: bool = False  # bodies have one byte flipped
    ignore_range: bool = False  # Range requests get the whole file (200)
    refuse: bool = False  # every connection closes without an answer
    redirect: bool = False  # resolve answers 302 to the same server under another host name, as the hub's CDN
    commit_header: bool = True  # the tree answer carries X-Repo-Commit
    page_size: int | None = None  # the tree comes in pages of this many entries, linked by `Link: rel="next"`
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.requests.clear()
        self.cut_after = self.stall_after = None
        self.corrupt = self.ignore_range = self.refuse = self.redirect = False
        self.commit_header = True
        self.page_size = None
        self.release.clear()

    def downloads(self) -> list[dict]:
        return [r for r in self.requests if "/resolve/" in r["path"] or r["path"].startswith("/cdn/")]

    def blob(self, sha: str) -> bytes | None:
        return next((d for files in self.repos.values() for d in files.values() if sha256(d) == sha), None)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        fake: FakeHub = self.server.hub
        fake.requests.append({"path": self.path, "range": self.headers.get("Range"),
                              "auth": self.headers.get("Authorization"), "host": self.headers.get("Host")})
        if fake.refuse:
            self.close_connection = True
            return  # not even a status line
        path = unquote(urlsplit(self.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(tree|revision)/main", path):
            files = fake.repos.get(m[1])
            if files is None:
                return self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            if m[2] == "revision":
                return self._send(200, json.dumps({"id": m[1], "sha": COMMIT}).encode())
            tree = [{"type": "directory", "path": "docs", "oid": "d" * 40}]
            for name, data in files.items():
                entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                if name.endswith(".gguf"):  # stored with LFS, as the hub stores GGUF files
                    entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
                tree.append(entry)
            headers = {"X-Repo-Commit": COMMIT} if fake.commit_header else {}
            if fake.page_size:  # the hub's cursor pagination
                start = int(dict(p.split("=") for p in urlsplit(self.path).query.split("&")).get("cursor", 0))
                if start + fake.page_size < len(tree):
                    headers["Link"] = f'<{fake.url}{path}?recursive=true&cursor={start + fake.page_size}>; rel="next"'
                tree = tree[start:start + fake.page_size]
            return self._send(200, json.dumps(tree).encode(), headers)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            data = fake.repos.get(m[1], {}).get(m[3])
            if data is None or m[2] != COMMIT:
                return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
            if fake.redirect:
                return self._send(302, b"", {"Location": f"http://localhost:{fake.port}/cdn/{sha256(data)}"})
            return self._body(data)
        if (m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path)) and (data := fake.blob(m[1])) is not None:
            return self._body(data)
        self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})

    def _body(self, data: bytes) -> None:
        fake: FakeHub = self.server.hub
        start, rng = 0, self.headers.get("Range")
        if rng and not fake.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = bytearray(data[start:])
        if fake.corrupt:
            body[len(body) // 2] ^= 0xFF
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut, stall = fake.cut_after, fake.stall_after
        fake.cut_after = fake.stall_after = None
        end = next((n for n in (cut, stall) if n is not None), len(body))
        self.wfile.write(body[:end])
        if stall is not None:
            fake.release.wait(30)
        self.close_connection = True


@pytest.fixture(scope="module")
def fake_hub():
    shipped = api.shipped_model()
    q4, f16, proj = (shipped[k].read_bytes() for k in ("text", "unquantized", "mmproj"))
    repos = {
        REPO: {F16: f16, TEXT: q4, MMPROJ: proj, "README.md": b"# ShapesTiny\n"},  # F16 listed first on purpose
        "test-org/NoProjector-GGUF": {TEXT: q4},
        "test-org/Escape-GGUF": {f"../../{TEXT}": q4, f"/{F16}": f16, MMPROJ: proj},  # paths that leave the snapshot
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hub = FakeHub(repos, server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.hub
    server.hub.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake(fake_hub, tmp_path, monkeypatch):
    """The fake hub, reset, as HF_ENDPOINT, with an empty cache as LLAVAO1_CACHE."""
    fake_hub.reset()
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "LLAVAO1_OFFLINE", "http_proxy", "HTTP_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("LLAVAO1_CACHE", str(tmp_path / "cache"))
    return fake_hub


def cache() -> Path:
    return Path(os.environ["LLAVAO1_CACHE"])


def repo_folder(repo: str = REPO) -> Path:
    return cache() / ("models--" + repo.replace("/", "--"))


def one_line_error(capsys) -> str:
    """The error line on stderr, after at most the lines naming the chosen files; never a traceback."""
    *before, last = capsys.readouterr().err.splitlines(keepends=True) or [""]
    assert last.startswith("llavao1-edge: ") and last.endswith("\n"), [*before, last]
    assert all(re.match(r"\S+/\S+: (text model|projector ) ", line) for line in before), before
    return last


# --------------------------------------------------------------------------------------------
# choosing files (the real rules, on listings of real repositories' names)


def listing(*names: str) -> list[RepoFile]:
    return [RepoFile(n, 1, "0" * 64) for n in names]


def chosen(ref: str, files: list[RepoFile]) -> tuple[str, str]:
    text, mmproj = hub.choose_files(ModelRef.parse(ref), files)
    return text.path, mmproj.path


def test_files_are_chosen_as_llama_cpp_chooses_them():
    gemma = listing("gemma-3-4b-it-f16.gguf", "gemma-3-4b-it-Q4_K_M.gguf", "gemma-3-4b-it-Q8_0.gguf",
                    "mmproj-model-f16.gguf", "README.md")
    assert chosen("ggml-org/gemma-3-4b-it-GGUF", gemma) == ("gemma-3-4b-it-Q4_K_M.gguf", "mmproj-model-f16.gguf")
    smol = listing("SmolVLM-256M-Instruct-f16.gguf", "SmolVLM-256M-Instruct-Q8_0.gguf",
                   "mmproj-SmolVLM-256M-Instruct-f16.gguf", "mmproj-SmolVLM-256M-Instruct-Q8_0.gguf")
    repo = "ggml-org/SmolVLM-256M-Instruct-GGUF"
    assert chosen(repo, smol) == ("SmolVLM-256M-Instruct-Q8_0.gguf", "mmproj-SmolVLM-256M-Instruct-Q8_0.gguf")
    assert chosen(repo + ":F16", smol) == ("SmolVLM-256M-Instruct-f16.gguf", "mmproj-SmolVLM-256M-Instruct-f16.gguf")
    assert chosen(repo + ":f16", smol)[0] == "SmolVLM-256M-Instruct-f16.gguf"  # any case
    q4 = listing("M-Q4_K_M.gguf", "mmproj-M-f16.gguf", "mmproj-M-Q8_0.gguf")  # the projector closest in bits
    assert chosen("o/M", q4) == ("M-Q4_K_M.gguf", "mmproj-M-Q8_0.gguf")
    assert chosen("o/M", listing("x.gguf", "M-q5_k_m.gguf", "M.imatrix.gguf", "mmproj-F16.gguf")) == ("x.gguf", "mmproj-F16.gguf")
    dotted = listing("model.Q4_K_S.gguf", "model.Q4_K_M.gguf", "model.mmproj-f16.gguf")
    assert chosen("o/M:Q4_K_M", dotted) == ("model.Q4_K_M.gguf", "model.mmproj-f16.gguf")
    nested = listing("mmproj-top-f16.gguf", "q4/M-Q4_K_M.gguf", "q4/mmproj-M-f16.gguf", "other/mmproj-M-Q4_K_M.gguf")
    assert chosen("o/M", nested) == ("q4/M-Q4_K_M.gguf", "q4/mmproj-M-f16.gguf")  # its own folder first, never a sibling's
    with pytest.raises(HubError, match=r"o/M has no Q6_K file; its quantizations: Q4_K_M, Q8_0$"):
        hub.choose_files(ModelRef.parse("o/M:Q6_K"), listing("M-Q4_K_M.gguf", "M-Q8_0.gguf", "mmproj-M-f16.gguf"))
    with pytest.raises(HubError, match="split into 3 files.*llama-gguf-split --merge"):
        hub.choose_files(ModelRef.parse("o/M:Q8_0"), listing("M-Q8_0-00002-of-00003.gguf",
                                                             "M-Q8_0-00001-of-00003.gguf", "mmproj-M-f16.gguf"))
    with pytest.raises(HubError, match="o/M has no mmproj"):
        hub.choose_files(ModelRef.parse("o/M"), listing("M-Q4_K_M.gguf"))
    with pytest.raises(HubError, match="no GGUF model file"):
        hub.choose_files(ModelRef.parse("o/M"), listing("model.safetensors", "mmproj-M-f16.gguf"))


def test_model_references_parse_and_bad_ones_are_one_line_errors(fake, capsys):
    assert ModelRef.parse("ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0") == ModelRef("ggml-org/SmolVLM-256M-Instruct-GGUF", "Q8_0")
    assert ModelRef.parse(" o/m ") == ModelRef("o/m") and str(ModelRef("o/m", "F16")) == "o/m:F16"
    for bad in ("just-a-name", "a/b/c", "a/b:", "../x", "o/../x", "org/na--me", "o/m:Q4 K", "o/m:a:b", "/m"):
        with pytest.raises(HubError, match="not a Hugging Face model"):
            ModelRef.parse(bad)
    assert cli.main(["pull", "a/b/c"]) == 1
    assert "'a/b/c' is not a Hugging Face model" in one_line_error(capsys)
    assert fake.requests == []


# --------------------------------------------------------------------------------------------
# pulling


def test_pull_stores_both_files_in_the_hub_cache_layout(fake, capsys):
    assert cli.main(["pull", f"{REPO}:Q4_K_M"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"{REPO}: text model {TEXT} (2.9 MiB)", f"{REPO}: projector  {MMPROJ} (3.8 MiB)"]
    folder = repo_folder()
    assert (folder / "refs" / "main").read_text() == COMMIT
    for name in (TEXT, MMPROJ):
        data = fake.repos[REPO][name]
        link = folder / "snapshots" / COMMIT / name
        assert link.is_symlink() and os.readlink(link) == f"../../blobs/{sha256(data)}"  # relative, as the hub's
        assert link.read_bytes() == data and str(link) in out
    assert sorted(p.name for p in (folder / "blobs").iterdir()) == sorted(sha256(fake.repos[REPO][n]) for n in (TEXT, MMPROJ))
    record = json.loads((folder / "llavao1-edge.json").read_text())
    assert record["quants"]["Q4_K_M"]["text"]["path"] == TEXT and "default" not in record
    assert [r["path"].split("?")[0] for r in fake.requests] == [
        f"/api/models/{REPO}/tree/main", f"/{REPO}/resolve/{COMMIT}/{TEXT}", f"/{REPO}/resolve/{COMMIT}/{MMPROJ}"]
    assert all(r["range"] is None and r["auth"] is None for r in fake.requests)
    fake.requests.clear()
    assert cli.main(["pull", f"{REPO}:q4_k_m"]) == 0  # any spelling of a pulled quantization: from the cache
    assert "in the cache already" in capsys.readouterr().err and fake.requests == []


def test_default_quantization_a_paged_tree_and_the_commit_from_the_revision_route(fake):
    fake.commit_header, fake.page_size = False, 2  # the projector is on the second page
    model = hub.pull(REPO, say=None)  # F16 is listed first; the default is Q4_K_M, as llama.cpp's
    assert model.files["text"].path == TEXT and model.files["mmproj"].path == MMPROJ and model.commit == COMMIT
    assert [r["path"].split("&cursor")[0] for r in fake.requests[:4]] == [
        f"/api/models/{REPO}/tree/main?recursive=true", f"/api/models/{REPO}/tree/main?recursive=true",
        f"/api/models/{REPO}/tree/main?recursive=true", f"/api/models/{REPO}/revision/main"]
    fake.requests.clear()
    assert hub.find_cached(REPO) == model and hub.find_cached(f"{REPO}:Q4_K_M") == model  # both, offline
    assert hub.find_cached(f"{REPO}:F16") is None and fake.requests == []


def test_an_interrupted_download_resumes_with_a_range_request(fake, capsys):
    fake.cut_after = 1_000_000
    assert cli.main(["pull", f"{REPO}:Q4_K_M", "-q"]) == 1
    err = one_line_error(capsys)
    assert f"{TEXT}: the download stopped at 1,000,000 of" in err and "it can be resumed" in err
    data = fake.repos[REPO][TEXT]
    partial = repo_folder() / "blobs" / f"{sha256(data)}.incomplete"
    assert partial.stat().st_size == 1_000_000 and not partial.with_suffix("").exists()
    fake.requests.clear()
    model = hub.pull(f"{REPO}:Q4_K_M", say=None)
    assert [r["range"] for r in fake.downloads()] == ["bytes=1000000-", None]
    assert sha256(model.text.read_bytes()) == sha256(data) and not partial.exists()


def test_a_server_that_ignores_range_gets_the_file_from_zero(fake):
    fake.cut_after = 123_457
    with pytest.raises(HubError, match="can be resumed"):
        hub.pull(f"{REPO}:Q4_K_M", say=None)
    fake.ignore_range = True
    model = hub.pull(f"{REPO}:Q4_K_M", say=None)
    assert fake.downloads()[1]["range"] == "bytes=123457-"  # asked, answered with 200 and the whole file
    assert model.text.read_bytes() == fake.repos[REPO][TEXT]


def test_a_corrupt_download_is_deleted_and_says_so(fake, capsys):
    fake.corrupt = True
    assert cli.main(["pull", f"{REPO}:Q4_K_M"]) == 1
    err = one_line_error(capsys)
    assert f"{TEXT}: sha256 mismatch" in err and "the file was deleted" in err
    assert list((repo_folder() / "blobs").iterdir()) == []
    fake.corrupt = False
    assert hub.pull(f"{REPO}:Q4_K_M", say=None).text.read_bytes() == fake.repos[REPO][TEXT]


def test_ctrl_c_keeps_the_partial_file_for_the_next_pull(fake):
    fake.stall_after = 500_000
    proc = subprocess.Popen([sys.executable, "-m", "llavao1_edge.cli", "pull", f"{REPO}:Q4_K_M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = repo_folder() / "blobs" / f"{sha256(fake.repos[REPO][TEXT])}.incomplete"
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size >= 500_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    fake.release.set()
    assert proc.returncode == 130, err
    assert "partial file is kept and can be resumed" in err and err.rstrip().endswith("llavao1-edge: interrupted")
    assert partial.stat().st_size == 500_000
    fake.requests.clear()
    model = hub.pull(f"{REPO}:Q4_K_M", say=None)
    assert fake.downloads()[0]["range"] == "bytes=500000-"
    assert model.text.read_bytes() == fake.repos[REPO][TEXT]


def test_the_token_goes_to_the_hub_and_never_to_the_cdn_it_redirects_to(fake, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    fake.redirect = True
    model = hub.pull(f"{REPO}:Q4_K_M", say=None)
    hub_requests = [r for r in fake.requests if not r["path"].startswith("/cdn/")]
    cdn_requests = [r for r in fake.requests if r["path"].startswith("/cdn/")]
    assert len(hub_requests) == 3 and all(r["auth"] == "Bearer hf_secret" for r in hub_requests)
    assert len(cdn_requests) == 2 and all(r["auth"] is None and r["host"].startswith("localhost") for r in cdn_requests)
    assert model.mmproj.read_bytes() == fake.repos[REPO][MMPROJ]


def test_hub_problems_are_one_line_errors(fake, monkeypatch, capsys):
    assert cli.main(["pull", "test-org/Nothing-GGUF"]) == 1
    assert "test-org/Nothing-GGUF: no such repository on http://127.0.0.1:" in (err := one_line_error(capsys))
    assert "(or it is private/gated: set HF_TOKEN)" in err
    assert cli.main(["pull", "test-org/NoProjector-GGUF"]) == 1
    assert "test-org/NoProjector-GGUF has no mmproj (vision projector) GGUF" in one_line_error(capsys)
    assert cli.main(["pull", f"{REPO}:Q5_K_M"]) == 1
    assert f"{REPO} has no Q5_K_M file; its quantizations: F16, Q4_K_M\n" in one_line_error(capsys)
    assert cli.main(["pull", "test-org/Escape-GGUF"]) == 1  # entries whose paths leave the snapshot are skipped
    assert "test-org/Escape-GGUF has no GGUF model file" in one_line_error(capsys)
    fake.refuse = True
    assert cli.main(["pull", REPO]) == 1
    assert f"cannot reach {fake.url}" in one_line_error(capsys)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    assert cli.main(["pull", REPO]) == 1
    assert f"cannot reach http://127.0.0.1:{closed} (" in one_line_error(capsys)
    assert not cache().exists() or not any(cache().rglob("*.gguf"))


def test_offline_a_cached_model_opens_without_the_network_and_a_missing_one_is_an_error(fake, monkeypatch, capsys):
    args = ["run", str(IMAGE), QUESTION, "--hf", f"{REPO}:Q4_K_M", "--search", "greedy", "--threads", "2", "--json",
            "--max-answer-tokens", "4"]  # opening the model is what counts here; the full run is the next test
    assert cli.main([*args, "--offline"]) == 1
    err = one_line_error(capsys)
    assert f"{REPO}:Q4_K_M is not in the cache ({cache()}) and offline mode is on" in err
    assert f"llavao1-edge pull {REPO}:Q4_K_M" in err and fake.requests == []
    for env in ("HF_HUB_OFFLINE", "LLAVAO1_OFFLINE"):
        monkeypatch.setenv(env, "1")
        assert cli.main(["pull", REPO]) == 1 and "offline mode is on" in one_line_error(capsys)
        monkeypatch.delenv(env)
    assert fake.requests == []
    hub.pull(f"{REPO}:Q4_K_M", say=None)
    fake.requests.clear()
    assert cli.main([*args, "--offline"]) == 0  # the flag
    assert json.loads(capsys.readouterr().out)["tokens"]["generated"] == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the variable; `REPO` alone was never pulled: it names what was
    with pytest.raises(HubError, match=f"not in the cache .*; pulled from it: {REPO}:Q4_K_M;"):
        api.Reasoner.from_hf(REPO)
    with api.Reasoner.from_hf(f"{REPO}:Q4_K_M", n_threads=2) as r:
        assert r.ask(IMAGE, QUESTION, strategy="greedy", max_answer_tokens=4).text
    assert fake.requests == []


def test_run_hf_answers_as_the_same_files_given_by_path(fake, capsys):
    text, mmproj = api.shipped_model_paths()
    flags = ["--search", "greedy", "--threads", "2", "--json"]
    assert cli.main(["run", str(IMAGE), QUESTION, "--model", str(text), "--mmproj", str(mmproj), *flags]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert cli.main(["run", str(IMAGE), QUESTION, "--hf", f"{REPO}:Q4_K_M", *flags]) == 0  # pulls, then runs
    out, err = capsys.readouterr()
    pulled = json.loads(out)
    assert pulled["text"] == direct["text"] and pulled["answer"] == direct["answer"]
    assert f"{REPO}: text model {TEXT}" in err and len(fake.downloads()) == 2
    assert cli.main(["run", str(IMAGE), QUESTION, "--hf", REPO, "--model", str(text)]) == 2
    assert "--hf names a model on the hub; it does not go with --model/--mmproj" in one_line_error(capsys)


def test_reasoner_from_hf_pulls_then_opens(fake, tmp_path):
    with api.Reasoner.from_hf(f"{REPO}:Q4_K_M", cache_dir=tmp_path / "elsewhere", n_threads=2) as r:
        result = r.ask(IMAGE, QUESTION, strategy="greedy", max_answer_tokens=8)
    assert result.text.startswith("<SUMMARY>") and len(fake.downloads()) == 2
    assert (tmp_path / "elsewhere" / "models--test-org--ShapesTiny-GGUF" / "llavao1-edge.json").exists()
    assert not cache().exists()  # cache_dir wins over LLAVAO1_CACHE


# --------------------------------------------------------------------------------------------
# list and rm


def test_list_describes_the_pulled_models_and_rm_keeps_shared_files(fake, capsys):
    assert cli.main(["list"]) == 0
    assert "0 models" in capsys.readouterr().out
    hub.pull(f"{REPO}:Q4_K_M", say=None)
    hub.pull(f"{REPO}:F16", say=None)  # shares the projector with Q4_K_M
    fake.requests.clear()
    assert cli.main(["list", "--json"]) == 0
    docs = {d["quant"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(docs) == {"Q4_K_M", "F16"} and fake.requests == []
    q4 = docs["Q4_K_M"]
    assert q4["ref"] == f"{REPO}:Q4_K_M" and q4["commit"] == COMMIT and q4["present"]
    assert q4["files"]["text"]["file"] == TEXT and q4["files"]["mmproj"]["file"] == MMPROJ
    assert q4["size_bytes"] == len(fake.repos[REPO][TEXT]) + len(fake.repos[REPO][MMPROJ])
    assert q4["family"].startswith("LLaVA") and q4["stage_tags_single_tokens"] is True
    assert "Q4_K" in q4["files"]["text"]["tensor_types"] and "Q4_K" not in docs["F16"]["files"]["text"]["tensor_types"]
    assert q4["files"]["mmproj"]["architecture"] == "clip"
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{REPO}:F16 ") and "stage tags single tokens" in lines[0]
    assert lines[1].startswith(f"  text    {F16}") and "F16 x" in lines[1] and lines[-1].startswith("2 models")

    assert cli.main(["rm", f"{REPO}:Q4_K_M", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert [m["ref"] for m in done["removed"]] == [f"{REPO}:Q4_K_M"]
    assert done["freed_bytes"] == len(fake.repos[REPO][TEXT])  # the projector stays: F16 uses it
    folder = repo_folder()
    assert not (folder / "snapshots" / COMMIT / TEXT).exists() and (folder / "snapshots" / COMMIT / MMPROJ).exists()
    assert hub.find_cached(f"{REPO}:Q4_K_M") is None and hub.find_cached(f"{REPO}:F16").present()
    assert cli.main(["rm", f"{REPO}:Q4_K_M"]) == 1
    assert f"{REPO}:Q4_K_M is not in the cache" in one_line_error(capsys)
    assert cli.main(["rm", REPO]) == 0  # every quantization of it
    assert "removed test-org/ShapesTiny-GGUF:F16" in capsys.readouterr().out
    assert not folder.exists() and fake.requests == []


def test_the_hub_client_stays_out_of_light_imports():
    code = ("import sys, llavao1_edge, llavao1_edge.cli; light = 'llavao1_edge.hub' not in sys.modules; "
            "import llavao1_edge.hub; print(light, [m for m in ('huggingface_hub', 'requests', 'httpx', 'torch') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True []"
