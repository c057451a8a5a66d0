"""What every bench command shares: question sets, provenance, statistics."""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from llavao1_data.records import RecordError, read_records, read_tsv
from llavao1_edge.stages import parse_answer


class BenchError(ValueError):
    pass


@dataclass
class BenchItem:
    id: str
    image: Path | bytes | None
    question: str  # as the user asks it (options included for multiple choice)
    reference: str
    category: str = "all"
    choices: dict[str, str] | None = None
    scene: list[dict] | None = None  # the shapes scene graph, when the records carry one (caption checks)


def load_items(path: str | os.PathLike, limit: int | None = None) -> list[BenchItem]:
    """Questions from LLaVA-CoT JSONL (reference: meta.answer or the CONCLUSION) or a VLMEvalKit TSV."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"{p}: file not found")
    items: list[BenchItem] = []
    if p.suffix == ".tsv":
        for q in read_tsv(p):
            items.append(BenchItem(q.index, q.image, q.prompt(), q.answer, q.category or "all", q.options))
            if limit and len(items) >= limit:
                break
        return items
    if p.suffix != ".jsonl":
        raise BenchError(f"{p}: expected a .jsonl (LLaVA-CoT records) or .tsv (VLMEvalKit) file")
    for rec in read_records(p):
        if rec.meta.get("kind", "cot") not in ("cot", "direct"):
            continue  # judge examples are not questions
        ref = rec.meta.get("answer") or parse_answer(rec.answer).conclusion or rec.answer.strip()
        items.append(BenchItem(rec.id, p.parent / rec.image if rec.image else None, rec.question, ref,
                               rec.meta.get("family", "all"), rec.meta.get("choices"), rec.meta.get("scene")))
        if limit and len(items) >= limit:
            break
    if not items:
        raise BenchError(f"{p}: no questions found")
    return items


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score), robust at 0% and 100%."""
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Provenance:
    commit: str = field(default_factory=_commit)
    cpu: str = field(default_factory=_cpu_model)
    cores: int = field(default_factory=lambda: os.cpu_count() or 0)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        import importlib.metadata as md

        for pkg in ("llavao1-edge", "llama-cpp-python", "gguf", "numpy", "onnxruntime", "transformers", "torch"):
            try:
                self.versions[pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check_model_files(model: str | None, mmproj: str | None) -> None:
    from llavao1_edge.modelfile import ModelFileError, check_model_pair

    if (model is None) != (mmproj is None):
        raise BenchError("--model and --mmproj go together")
    if model:
        try:
            check_model_pair(model, mmproj)
        except ModelFileError as e:
            raise BenchError(str(e)) from None


__all__ = ["BenchError", "BenchItem", "Provenance", "RecordError", "load_items", "peak_rss_mb", "sha256_file",
           "wilson_interval"]
