"""Latency per question: image encode, prefill and decode speed, time to first token, total.

Each measured run starts cold (no cached image, no reused prefix) after a warm-up run. A second
question on the same image then measures what the image cache buys: its time to first token
against the cold one. `compare_reference` also times the paper-style implementation; `compare_greedy`
times greedy decoding on the same question right after each run, so "x greedy" is a ratio of two
timings taken back to back (the median of those), not of two medians taken minutes apart.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

from llavao1_edge.search import SearchConfig

from .backends import GGUFBackend
from .common import BenchItem, Provenance, peak_rss_mb, sha256_file
from .paper_search import PaperStyleSearch

FOLLOW_UP = "How many objects are there?"  # the second question on a cached image


@dataclass
class LatencyReport:
    search: str
    runs: list[dict] = field(default_factory=list)  # one per (question, repeat)
    reference_runs: list[float] = field(default_factory=list)  # paper-style total seconds
    peak_rss_mb: float = 0.0
    provenance: dict = field(default_factory=dict)  # commit, CPU, versions, date, model hash, threads

    def stat(self, key: str) -> dict:
        vals = [r[key] for r in self.runs if r.get(key) is not None]
        if not vals:
            return {}
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    def judge_prompt_tokens(self) -> dict:
        """Median judge prompt tokens evaluated per question, by what was judged (a stage, "check", "answer")."""
        units = sorted({k.removeprefix("judge_prompt_") for r in self.runs for k in r.get("tokens", {})
                        if k.startswith("judge_prompt_")})
        return {u: statistics.median(r["tokens"].get(f"judge_prompt_{u}", 0) for r in self.runs) for u in units}

    def to_json(self) -> dict:
        keys = ("image_encode_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "decode_s", "judge_s", "total_s",
                "cached_ttft_s", "cached_ttft_ratio")
        out = {"search": self.search, "n_runs": len(self.runs), "peak_rss_mb": self.peak_rss_mb,
               **{k: self.stat(k) for k in keys}}
        for key in ("greedy_total_s", "x_greedy"):  # with compare_greedy only
            if s := self.stat(key):
                out[key] = s
        if judged := self.judge_prompt_tokens():
            out["judge_prompt_tokens"] = judged
        out["runs"] = self.runs
        if self.provenance:
            out["provenance"] = self.provenance
        if self.reference_runs:
            ref = statistics.median(self.reference_runs)
            out["reference_total_s"] = {"median": ref, "min": min(self.reference_runs), "max": max(self.reference_runs)}
            out["speedup_vs_reference"] = ref / self.stat("total_s")["median"]
        return out

    def table(self) -> str:
        d = self.to_json()
        lines = [f"search {self.search}: {d['n_runs']} runs, peak RSS {self.peak_rss_mb:.0f} MiB"]
        for key, unit in (("image_encode_s", "s"), ("prefill_tok_s", "tok/s"), ("decode_tok_s", "tok/s"),
                          ("ttft_s", "s"), ("decode_s", "s"), ("judge_s", "s"), ("total_s", "s"),
                          ("cached_ttft_s", "s"), ("cached_ttft_ratio", "")):
            s = d.get(key)
            if s:
                lines.append(f"  {key:<18} median {s['median']:.4g} {unit}  (min {s['min']:.4g}, max {s['max']:.4g})")
        if judged := d.get("judge_prompt_tokens"):
            lines.append("  judge prompt tokens, median per question: "
                         + ", ".join(f"{u} {v:.0f}" for u, v in judged.items()))
        if "x_greedy" in d:
            lines.append(f"  greedy total       median {d['greedy_total_s']['median']:.4g} s -> "
                         f"x greedy (paired) {d['x_greedy']['median']:.2f}  (min {d['x_greedy']['min']:.2f}, "
                         f"max {d['x_greedy']['max']:.2f})")
        if "speedup_vs_reference" in d:
            lines.append(f"  paper-style total  median {d['reference_total_s']['median']:.4g} s -> "
                         f"speed-up {d['speedup_vs_reference']:.2f}x")
        return "\n".join(lines)


def _cold(backend: GGUFBackend) -> None:
    backend.reasoner.engine.clear_caches()


def run_latency(backend: GGUFBackend, items: list[BenchItem], cfg: SearchConfig, repeats: int = 3,
                compare_reference: bool = False, label: str = "", progress: bool | None = None,
                compare_greedy: bool = False) -> LatencyReport:
    from tqdm import tqdm

    report = LatencyReport(label or cfg.strategy)
    greedy_cfg = replace(cfg, strategy="greedy", candidates=1)  # the same budgets, no search
    _cold(backend)
    backend.answer(items[0], cfg)  # warm-up: page in weights, allocate buffers
    total = len(items) * repeats
    bar = tqdm(total=total, desc="latency", unit="run", disable=None if progress is None else not progress)
    for item in items:
        for r in range(repeats):
            _cold(backend)
            ans = backend.answer(item, cfg)
            t, tok = ans.timings, ans.timings["tokens"]
            follow_cfg = SearchConfig(strategy="greedy", max_answer_tokens=8)
            follow = backend.answer(BenchItem(item.id, item.image, FOLLOW_UP, ""), follow_cfg)
            run = {
                "id": item.id, "repeat": r, "total_s": ans.seconds, "image_encode_s": t.get("image_encode_s", 0.0),
                "prefill_tok_s": tok.get("prompt_evaluated", 0) / t["prefill_s"] if t.get("prefill_s") else None,
                "decode_tok_s": tok.get("generated", 0) / t["decode_s"] if t.get("decode_s") else None,
                "ttft_s": t.get("first_token_s"), "cached_ttft_s": follow.timings.get("first_token_s"),
                "decode_s": t.get("decode_s", 0.0), "judge_s": t.get("judge_s", 0.0),
                "tokens": tok, "flags": t.get("flags", []),
            }
            if run["ttft_s"] and run["cached_ttft_s"]:
                run["cached_ttft_ratio"] = run["cached_ttft_s"] / run["ttft_s"]
            if compare_greedy:
                _cold(backend)
                run["greedy_total_s"] = backend.answer(item, greedy_cfg).seconds
                run["x_greedy"] = run["total_s"] / run["greedy_total_s"]
            report.runs.append(run)
            if compare_reference:
                _cold(backend)
                t0 = time.perf_counter()
                PaperStyleSearch(backend.reasoner.engine, cfg).run(item.image, item.question)
                report.reference_runs.append(time.perf_counter() - t0)
            bar.update(1)
    bar.close()
    report.peak_rss_mb = peak_rss_mb()
    report.provenance = {**asdict(Provenance()), "model_sha256": sha256_file(backend.model),
                         "threads": backend.reasoner.engine.config.n_threads or os.cpu_count()}
    return report
