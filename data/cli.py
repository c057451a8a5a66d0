"""`llavao1-data`: generate shapes datasets and validate record files.

  llavao1-data shapes --out data/train --n 5000 --seed 1
  llavao1-data shapes --out data/eval --n 500 --seed 1001 --split eval --kinds cot
  llavao1-data shapes --out data/mmstyle --n 200 --seed 7 --split eval --format tsv
  llavao1-data merge --out data/mix data/train data/drills
  llavao1-data validate data/train/records.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict

from llavao1_edge.extras import run_guarded
from llavao1_edge.stages import parse_answer

from .records import RecordError, read_records, read_tsv
from .shapes.dataset import FORMATS, KINDS, SPLITS, ShapesConfig, merge_datasets, write_dataset
from .shapes.questions import FAMILIES, MC_STEPS, REASONING_STYLES
from .shapes.scene import CAPTION_ORDERS


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llavao1-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("shapes", help="generate a shapes visual-reasoning dataset",
                       description="Write DIR/records.jsonl and DIR/images/ (or DIR/records.tsv). "
                       "The same arguments always give byte-identical output.")
    d = ShapesConfig()
    s.add_argument("--out", required=True, help="output folder (created; replaced if it holds a dataset)")
    s.add_argument("--n", type=int, default=d.n, help=f"number of questions, one image each (default {d.n})")
    s.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    s.add_argument("--split", choices=SPLITS, default=d.split,
                   help="train, or eval: questions with reference answers only, no judge examples")
    s.add_argument("--format", choices=FORMATS, default=d.format,
                   help="jsonl (LLaVA-CoT conversations) or tsv (VLMEvalKit multiple choice)")
    s.add_argument("--kinds", type=_csv, default=None,
                   help=f"records per question, comma list of {','.join(KINDS)} "
                   f"(default: {','.join(d.kinds)} for train, cot for eval)")
    s.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels (default %(default)s)")
    s.add_argument("--mc-fraction", type=float, default=d.mc_fraction,
                   help="share of multiple-choice questions in jsonl output (default %(default)s)")
    s.add_argument("--judge-fraction", type=float, default=d.judge_fraction,
                   help="share of questions that also get judge examples (default %(default)s)")
    s.add_argument("--option-fraction", type=float, default=d.option_fraction,
                   help="share of questions that also get an option drill, with --kinds ...,option (default %(default)s)")
    s.add_argument("--caption-fraction", type=float, default=d.caption_fraction,
                   help="share of questions that also get a caption-only record (the image, 'Describe the image.' "
                   "-> the CAPTION stage), with --kinds ...,caption (default %(default)s)")
    s.add_argument("--reasoning-fraction", type=float, default=d.reasoning_fraction,
                   help="share of questions that also get a text-only reasoning drill (question, SUMMARY and CAPTION "
                   "given -> REASONING and CONCLUSION), with --kinds ...,reasoning (default %(default)s)")
    s.add_argument("--families", type=_csv, default=d.families,
                   help=f"question families, comma list (default all: {','.join(FAMILIES)})")
    s.add_argument("--caption-order", choices=CAPTION_ORDERS, default=d.caption_order,
                   help="how captions list the objects: left-to-right (the shipped model), or regions "
                   "(top left, top, ... bottom right; measured, not shipped) (default %(default)s)")
    s.add_argument("--mc-step", choices=MC_STEPS, default=d.mc_step,
                   help="how the reasoning names a multiple-choice option: match (one sentence, 'The answer 2 "
                   "matches option B.'; the shipped model) or check (the options line by line as the question "
                   "lists them, ending on the match) (default %(default)s)")
    s.add_argument("--reasoning-style", choices=REASONING_STYLES, default=d.reasoning_style,
                   help="how the reasoning picks objects out of the caption: list (names the matching ones at once; "
                   "the shipped model), scan (walks every object in caption order, 'a small red circle at the "
                   "top: red? yes, 1; a large green square at the right: red? no') or read (the walk, each step first "
                   "reading the object's own value: 'a small red circle at the top is red: red? yes, 1') "
                   "(default %(default)s)")
    s.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    m = sub.add_parser("merge", help="join datasets into one (their records in order, their images)",
                       description="Write DIR/records.jsonl with every record of the inputs in the order given, and "
                       "their images (hard links where possible). Record ids must be unique; an image path shared by "
                       "two inputs must hold the same bytes.")
    m.add_argument("--out", required=True, help="output folder (created; replaced if it holds a dataset)")
    m.add_argument("inputs", nargs="+", help="dataset folders (or records.jsonl files), at least two")

    v = sub.add_parser("validate", help="check a records.jsonl or VLMEvalKit .tsv file",
                       description="Validate every record; for LLaVA-CoT answers also check the four-stage "
                       "format and, for shapes records, that CONCLUSION equals the stored answer.")
    v.add_argument("file", help="records.jsonl or .tsv")
    v.add_argument("--root", help="image root for JSONL (default: the file's folder)")
    v.add_argument("--json", action="store_true", help="print a JSON summary")
    return p


def _shapes(args: argparse.Namespace) -> int:
    kinds = args.kinds if args.kinds is not None else (("cot",) if args.split == "eval" else ShapesConfig().kinds)
    cfg = ShapesConfig(n=args.n, seed=args.seed, split=args.split, kinds=kinds, image_size=args.image_size,
                       mc_fraction=args.mc_fraction, judge_fraction=args.judge_fraction,
                       option_fraction=args.option_fraction,
                       caption_fraction=args.caption_fraction, reasoning_fraction=args.reasoning_fraction,
                       families=args.families,
                       format=args.format, caption_order=args.caption_order, mc_step=args.mc_step,
                       reasoning_style=args.reasoning_style)
    if args.print_config:
        print(json.dumps(asdict(cfg), indent=2))
        return 0
    cfg.validate()
    t0 = time.perf_counter()
    path = write_dataset(cfg, args.out, progress=False if args.quiet else None)
    print(f"wrote {path} ({cfg.n} questions, {time.perf_counter() - t0:.1f} s)")
    return 0


def validate_file(path: str, root: str | None = None) -> dict:
    """Counts of records by kind and of problems found; raises RecordError on a bad record."""
    counts: Counter = Counter()
    problems: list[str] = []
    if path.endswith(".tsv"):
        for _row in read_tsv(path):
            counts["tsv"] += 1
        return {"file": path, "records": dict(counts), "problems": problems}
    for rec in read_records(path, root):
        kind = rec.meta.get("kind", "record")
        counts[kind] += 1
        if kind != "cot":
            continue
        parsed = parse_answer(rec.answer)
        if not parsed.well_formed:
            problems.append(f"{rec.id}: {'; '.join(parsed.issues)}")
        if "answer" in rec.meta and parsed.conclusion != rec.meta["answer"]:
            problems.append(f"{rec.id}: CONCLUSION {parsed.conclusion!r} != answer {rec.meta['answer']!r}")
    return {"file": path, "records": dict(counts), "problems": problems}


def _validate(args: argparse.Namespace) -> int:
    report = validate_file(args.file, args.root)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        total = sum(report["records"].values())
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(report["records"].items()))
        print(f"{args.file}: {total} records ({kinds}), {len(report['problems'])} problems")
        for line in report["problems"][:20]:
            print(f"  {line}")
    return 1 if report["problems"] else 0


def _merge(args: argparse.Namespace) -> int:
    path, n = merge_datasets(args.inputs, args.out)
    print(f"wrote {path} ({n} records from {len(args.inputs)} datasets)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"shapes": _shapes, "merge": _merge, "validate": _validate}[args.command]
    return run_guarded("llavao1-data", lambda: command(args),
                       (RecordError, ValueError, OSError), "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
