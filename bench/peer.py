"""Our runtime against llama-cpp-python's own chat API (`Llama.create_chat_completion` with its
`MTMDChatHandler`) on the same GGUF pair, image and question:

- process: the wall time of `llavao1-edge run IMAGE QUESTION --search greedy` against a script that
  does what a llama-cpp-python user writes, each as a fresh process, alternating;
- decode: in one process, both greedy, the tokens each generates (they must be the same) and the
  decode speed from the first generated token to the last.

The peer gets the image as an image_url part with a data: URI, as its users send it, and the question
as the text part after it ("\\n" + question), which renders the prompt our runtime renders for templates
that join content parts.
"""

from __future__ import annotations

import base64
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PEER_PROCESS = """
import base64, sys
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler
model, mmproj, image, question, threads, n_ctx = sys.argv[1:7]
llm = Llama(model_path=model, chat_handler=MTMDChatHandler(clip_model_path=mmproj, verbose=False),
            n_ctx=int(n_ctx), n_threads=int(threads), verbose=False)
uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
out = llm.create_chat_completion(messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "\\n" + question}]}],
    temperature=0.0, repeat_penalty=1.0, max_tokens=2048)
print(out["choices"][0]["message"]["content"])
"""


def peer_messages(image: str | os.PathLike, question: str) -> list[dict]:
    uri = "data:image/png;base64," + base64.b64encode(Path(image).read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "\n" + question}]}]


@dataclass
class PeerReport:
    model: str
    mmproj: str
    threads: int
    process: list[dict] = field(default_factory=list)  # per run: ours_s, peer_s
    decode: list[dict] = field(default_factory=list)  # per question: tokens, same_tokens, ours/peer tok/s
    provenance: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {}
        if self.process:
            ours = statistics.median(r["ours_s"] for r in self.process)
            peer = statistics.median(r["peer_s"] for r in self.process)
            out["process"] = {"ours_s": ours, "peer_s": peer, "x_peer": ours / peer,
                              "x_peer_paired": statistics.median(r["ours_s"] / r["peer_s"] for r in self.process)}
        if self.decode:
            ours = statistics.median(r["ours_tok_s"] for r in self.decode)
            peer = statistics.median(r["peer_tok_s"] for r in self.decode)
            out["decode"] = {"ours_tok_s": ours, "peer_tok_s": peer, "x_peer": ours / peer,
                             "same_tokens": all(r["same_tokens"] for r in self.decode)}
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    def table(self) -> str:
        s = self.summary()
        lines = [f"{self.model} + {self.mmproj}, {self.threads} threads"]
        if "process" in s:
            p = s["process"]
            lines.append(f"  whole process  ours {p['ours_s']:.3f} s, llama-cpp-python {p['peer_s']:.3f} s: "
                         f"{p['x_peer']:.2f}x (paired median {p['x_peer_paired']:.2f}x, {len(self.process)} runs each)")
        if "decode" in s:
            d = s["decode"]
            lines.append(f"  greedy decode  ours {d['ours_tok_s']:.1f} tok/s, llama-cpp-python {d['peer_tok_s']:.1f} "
                         f"tok/s: {d['x_peer']:.3f}x; same tokens: {'yes' if d['same_tokens'] else 'NO'} "
                         f"({len(self.decode)} questions)")
        return "\n".join(lines)


def _our_command() -> list[str]:
    exe = shutil.which("llavao1-edge")
    return [exe] if exe else [sys.executable, "-m", "llavao1_edge.cli"]


def measure_process(report: PeerReport, items, repeats: int, n_ctx: int) -> None:
    """Fresh processes, ours and the peer alternating, so drift in machine speed hits both alike. Both start
    from compiled bytecode, as a normal install has it (pip compiles the peer's on install; an editable
    install under PYTHONDONTWRITEBYTECODE would compile ours in every process)."""
    import compileall

    import llavao1_edge

    compileall.compile_dir(os.path.dirname(llavao1_edge.__file__), quiet=1)
    for item in items:
        for _ in range(repeats):
            ours = [*_our_command(), "run", str(item.image), item.question, "--search", "greedy", "--model",
                    report.model, "--mmproj", report.mmproj, "--threads", str(report.threads), "--ctx", str(n_ctx)]
            peer = [sys.executable, "-c", PEER_PROCESS, report.model, report.mmproj, str(item.image), item.question,
                    str(report.threads), str(n_ctx)]
            times = {}
            for name, cmd in (("ours", ours), ("peer", peer)):
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                times[name] = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            report.process.append({"id": item.id, "ours_s": times["ours"], "peer_s": times["peer"]})


def measure_decode(report: PeerReport, items, n_ctx: int) -> None:
    """Both runtimes loaded in this process; each question answered greedily by each, twice (the first
    warms caches), the second timed from its first generated token to its last."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from llavao1_edge.api import Reasoner
    from llavao1_edge.options import EngineConfig, SearchConfig

    peer = Llama(model_path=report.model, chat_handler=MTMDChatHandler(clip_model_path=report.mmproj, verbose=False),
                 n_ctx=n_ctx, n_threads=report.threads, verbose=False)
    greedy = SearchConfig(strategy="greedy", force_format=False)
    with Reasoner(report.model, report.mmproj, EngineConfig(n_ctx=n_ctx, n_threads=report.threads)) as ours:
        for item in items:
            for timed in (False, True):
                ours.engine.clear_caches()
                res = ours.ask(item.image, item.question, greedy)
                tokens = [t for s in res.steps for t in s.candidates[s.chosen].tokens]
                ours_s = res.timings["total_s"] - res.timings["first_token_s"]
                t0, first = time.perf_counter(), None
                for chunk in peer.create_chat_completion(messages=peer_messages(item.image, item.question),
                                                         temperature=0.0, repeat_penalty=1.0, max_tokens=2048,
                                                         stream=True):
                    if first is None and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
                peer_s = time.perf_counter() - (first or t0)
                if timed:
                    n = max(1, len(tokens) - 1)  # the tokens after the first
                    report.decode.append({"id": item.id, "tokens": len(tokens),
                                          "same_tokens": _generated(peer, tokens) == tokens,
                                          "ours_tok_s": n / ours_s, "peer_tok_s": n / peer_s})


def _generated(peer, tokens: list[int]) -> list[int]:
    """The tokens the peer generated last: the end of its context (its end token is not decoded)."""
    held = list(peer.input_ids[:peer.n_tokens])
    return held[len(held) - len(tokens):]
