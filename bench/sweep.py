"""The quantization x search sweep: every cell's accuracy and latency, resumable, with a report.

Files are quantized once through export/ and cached under OUT/models/; finished cells are kept
in OUT/results.json and skipped when the sweep runs again with the same OUT.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llavao1_data.records import atomic_text_file
from llavao1_edge.formats import ONNX_QUANTS, type_of_file
from llavao1_edge.options import EngineConfig, SearchConfig, parse_spec, spec_label

from .accuracy import run_accuracy
from .common import (
    BenchError,
    BenchItem,
    Provenance,
    load_items,
    sha256_file,
    wilson_interval,
)
from .plots import STAGE_UNITS, pareto_front, write_plots

CSV_COLUMNS = ("cell", "backend", "quant", "mmproj_quant", "search", "accuracy", "ci95_low", "ci95_high", "n",
               "median_total_s", "mean_total_s", "median_ttft_s", "size_mb", "model_sha256", "threads", "commit", "date")


@dataclass
class SweepConfig:
    data: str
    out: str
    gguf: str | None = None  # F16 (or F32) text model ...
    mmproj: str | None = None  # ... and its projector
    checkpoint: str | None = None  # or a Hugging Face checkpoint folder: converted, plus ONNX and transformers rows
    quants: tuple[str, ...] = ("F16", "Q8_0", "Q4_K_M")
    mmproj_quants: tuple[str, ...] = ("F16",)
    searches: tuple[str, ...] = ("greedy", "stage:2")
    onnx_quants: tuple[str, ...] = ("none", "int8", "int4")  # with --checkpoint only
    limit: int | None = None
    threads: int = 0
    progress: bool | None = None


@dataclass
class Plan:
    items: list[BenchItem]
    searches: dict[str, SearchConfig]
    quants: list[str]
    mmproj_quants: list[str]
    cells: list[dict] = field(default_factory=list)


def validate(cfg: SweepConfig) -> Plan:
    """Every problem found before any long work starts, one line each."""
    from llavao1_export.quantize import normalise_type

    problems: list[str] = []
    items: list[BenchItem] = []
    try:
        items = load_items(cfg.data, cfg.limit)
    except (BenchError, ValueError) as e:
        problems.append(str(e))
    if cfg.gguf and cfg.checkpoint:
        problems.append("give either --gguf with --mmproj, or --checkpoint, not both")
    if not cfg.gguf and not cfg.checkpoint:  # the model the package ships
        from llavao1_edge.api import ModelNotFound, shipped_model

        try:
            files = shipped_model()
            cfg.gguf, cfg.mmproj = str(files["unquantized"]), str(files["mmproj"])
        except ModelNotFound as e:
            problems.append(str(e))
    if cfg.gguf:
        from llavao1_edge.modelfile import ModelFileError, check_model_pair

        if not cfg.mmproj:
            problems.append("--gguf needs --mmproj")
        else:
            try:
                check_model_pair(cfg.gguf, cfg.mmproj)
            except ModelFileError as e:
                problems.append(str(e))
    if cfg.checkpoint and not (Path(cfg.checkpoint) / "config.json").is_file():
        problems.append(f"{cfg.checkpoint}: not a Hugging Face checkpoint folder (no config.json)")
    quants, mquants = [], []
    for names, dest in ((cfg.quants, quants), (cfg.mmproj_quants, mquants)):
        for q in names:
            try:
                dest.append(normalise_type(q))
            except ValueError as e:
                problems.append(str(e))
    searches = {}
    for s in cfg.searches:
        try:
            searches[s] = parse_spec(s)
        except ValueError as e:
            problems.append(str(e))
    for q in cfg.onnx_quants:
        if q not in ONNX_QUANTS:
            problems.append(f"ONNX quantization {q!r} is not one of {', '.join(ONNX_QUANTS)}")
    if problems:
        raise BenchError("; ".join(problems))
    return Plan(items, searches, quants, mquants)


def _atomic_write(path: Path, text: str) -> None:
    with atomic_text_file(path) as f:
        f.write(text)


def _prepare_models(cfg: SweepConfig, plan: Plan, log) -> tuple[Path, Path]:
    """The source F16 text model and projector (converted from --checkpoint when needed), in OUT/models."""
    models = Path(cfg.out) / "models"
    models.mkdir(parents=True, exist_ok=True)
    if cfg.gguf:
        return Path(cfg.gguf), Path(cfg.mmproj)
    from llavao1_export.gguf_convert import convert_to_gguf

    name = Path(cfg.checkpoint).name
    text, mmproj = models / f"{name}-f16.gguf", models / f"mmproj-{name}-f16.gguf"
    if not (text.is_file() and mmproj.is_file()):
        log(f"converting {cfg.checkpoint} to GGUF")
        res = convert_to_gguf(cfg.checkpoint, models, "f16")
        text, mmproj = res.text, res.mmproj
    return text, mmproj


def _quantized(src: Path, qtype: str, models: Path, prefix: str, log) -> Path:
    from llavao1_export.quantize import quantize_gguf

    if type_of_file(src) == qtype:  # the source already is that type
        return src
    dst = models / f"{prefix}-{qtype}.gguf"
    if not dst.is_file():
        log(f"quantizing {src.name} to {qtype}")
        quantize_gguf(src, dst, qtype)
    return dst


def _summarise(answers: list, cfg: SearchConfig | None) -> dict:
    totals = [a.seconds for a in answers]
    ttft = [a.timings["first_token_s"] for a in answers if a.timings.get("first_token_s")]
    stage = {}
    if answers and answers[0].timings:
        n = len(answers)
        for unit in STAGE_UNITS:
            stage[unit] = sum(a.timings.get(f"{unit}_decode_s", 0.0) for a in answers) / n
        stage["judge"] = sum(a.timings.get("judge_s", 0.0) for a in answers) / n
        stage["other"] = max(0.0, statistics.mean(totals) - sum(stage.values()))
    return {"median_total_s": statistics.median(totals), "mean_total_s": statistics.mean(totals),
            "median_ttft_s": statistics.median(ttft) if ttft else None, "stage_s": stage}


def run_sweep(cfg: SweepConfig, log=lambda s: None) -> dict:
    plan = validate(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    done: dict[str, dict] = json.loads(results_path.read_text())["cells"] if results_path.is_file() else {}
    prov = Provenance()
    text_src, mmproj_src = _prepare_models(cfg, plan, log)
    models = out / "models"
    jobs = []
    for q in plan.quants:
        for mq in plan.mmproj_quants:
            for scfg in plan.searches.values():
                jobs.append(("gguf", q, mq, scfg))
    if cfg.checkpoint:
        jobs += [("onnx", {"none": "fp32"}.get(q, q), None, parse_spec("greedy")) for q in cfg.onnx_quants]
        jobs.append(("transformers", "fp32", None, parse_spec("greedy")))
    for backend_name, q, mq, scfg in jobs:
        cell = f"{backend_name}|{q}|{mq or '-'}|{spec_label(scfg)}"
        if cell in done:
            log(f"skip {cell} (done)")
            continue
        log(f"cell {cell}")
        if backend_name == "gguf":
            from .backends import GGUFBackend

            text = _quantized(text_src, q, models, "text", log)
            proj = _quantized(mmproj_src, mq, models, "mmproj", log)
            backend = GGUFBackend(str(text), str(proj), EngineConfig(n_threads=cfg.threads, n_seq_max=17))
            files = [text, proj]
        elif backend_name == "onnx":
            from llavao1_export.onnx_export import export_onnx

            from .backends import OnnxBackend

            folder = models / f"onnx-{q}"
            if not (folder / "llavao1_onnx.json").is_file():
                log(f"exporting ONNX {q}")
                export_onnx(cfg.checkpoint, folder, {"fp32": "none"}.get(q, q))
            backend = OnnxBackend(folder, cfg.threads)
            files = [folder / g for g in ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")]
        else:
            from .backends import HFBackend

            backend = HFBackend(cfg.checkpoint, cfg.threads)
            files = list(Path(cfg.checkpoint).glob("*.safetensors"))
        answers: list = []

        def answer(item, _b=backend, _c=scfg, _sink=answers):
            a = _b.answer(item, _c)
            _sink.append(a)
            return a

        acc = run_accuracy(plan.items, answer, cfg.progress)
        backend.close()
        lo, hi = wilson_interval(acc.correct, acc.n)
        row = {"cell": cell, "backend": backend_name, "quant": q, "mmproj_quant": mq, "search": spec_label(scfg),
               "search_config": asdict(scfg), "accuracy": acc.accuracy, "ci95_low": lo, "ci95_high": hi, "n": acc.n,
               "by_category": acc.by_category,
               **_summarise(answers, scfg),
               "size_mb": sum(f.stat().st_size for f in files) / 2**20,
               "model_sha256": sha256_file(files[0]), "files": [str(f) for f in files],
               "quant_types": _types(files[0]) if backend_name == "gguf" else None,
               "threads": cfg.threads or os.cpu_count(), "commit": prov.commit, "cpu": prov.cpu,
               "versions": prov.versions, "date": prov.date, "failures": acc.failures,
               "questions_sha256": acc.questions_sha256}
        done[cell] = row
        _atomic_write(results_path, json.dumps({"cells": done}, indent=2))
    rows = list(done.values())
    write_outputs(rows, out)
    return {"cells": done}


def _types(path: Path) -> dict:
    from llavao1_edge.modelfile import describe

    return describe(path).tensor_types


def _category_accuracy(row: dict, cat: str) -> float:
    v = row.get("by_category", {}).get(cat, float("nan"))
    return v["accuracy"] if isinstance(v, dict) else v  # cells written before the counts were kept: a float


def write_outputs(rows: list[dict], out: Path) -> None:
    with atomic_text_file(out / "results.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    plots = write_plots(rows, out)
    _atomic_write(out / "report.md", render_report(rows, plots))


def render_report(rows: list[dict], plots: list[Path]) -> str:
    front = set(pareto_front([(r["median_total_s"], r["accuracy"]) for r in rows]))
    first = rows[0] if rows else {}
    lines = ["# llavao1-bench sweep", "",
             f"{len(rows)} cells, {first.get('n', 0)} questions each; commit {first.get('commit')}, "
             f"{first.get('cpu')}, {first.get('threads')} threads, {first.get('date')}.", "",
             "| backend | text | mmproj | search | accuracy | 95% CI | median s/question | TTFT s | size MiB | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        ttft = f"{r['median_ttft_s']:.3f}" if r.get("median_ttft_s") else "-"
        lines.append(f"| {r['backend']} | {r['quant']} | {r.get('mmproj_quant') or '-'} | {r['search']} | "
                     f"{r['accuracy']:.3f} | [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}] | {r['median_total_s']:.3f} | "
                     f"{ttft} | {r['size_mb']:.1f} | {'*' if i in front else ''} |")
    cats = sorted({c for r in rows for c in r.get("by_category", {})})
    if cats and len(cats) > 1:
        lines += ["", "Accuracy by category:", "", "| cell | " + " | ".join(cats) + " |",
                  "|---|" + "---|" * len(cats)]
        for r in rows:
            lines.append(f"| {r['backend']} {r['quant']}{'/' + r['mmproj_quant'] if r.get('mmproj_quant') else ''} "
                         f"{r['search']} | " +
                         " | ".join(f"{_category_accuracy(r, c):.2f}" for c in cats) + " |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in first.get("versions", {}).items())]
    return "\n".join(lines) + "\n"
