"""`llavao1-bench`: latency, accuracy, paired comparisons and quantization x search sweeps.

examples:
  llavao1-bench latency --search stage:4 --compare-reference
  llavao1-bench batching --threads 2          # is a step with N sequences ~1x or ~Nx one? (search's price)
  llavao1-bench peer --threads 2              # against llama-cpp-python's create_chat_completion: startup, tok/s
  llavao1-bench accuracy --data eval/records.jsonl --search greedy --limit 200
  llavao1-bench accuracy --model my.gguf --mmproj my-mmproj.gguf --data MMStar.tsv --json
  llavao1-bench compare greedy.json stage4.json   # which questions stage:4 fixes / breaks, McNemar's exact p
  llavao1-bench random-model qwen2vl-2b --out runs/qwen2vl-2b   # a published shape, random weights, Q4_K_M
  llavao1-bench serve --clients 1,2,4,8       # the local server under load, and its overhead per request
  llavao1-bench sweep --data eval/records.jsonl --gguf m-f16.gguf --mmproj mmproj-f16.gguf \\
      --quants F16,Q8_0,Q4_K_M --search greedy,stage:2 --limit 100 --out sweep/

Without --model / --gguf / --checkpoint the model the package ships is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace

from llavao1_edge.cli import ENGINE_FLAGS
from llavao1_edge.extras import require_extra, run_guarded
from llavao1_edge.options import SPEC_HELP as SEARCH_HELP
from llavao1_edge.options import EngineConfig, SearchConfig, add_arguments, from_args

BUDGETS = ("max_stage_tokens", "max_answer_tokens")  # the token budgets `latency` takes beside the spec


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llavao1-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", help="text model GGUF (default: the shipped model)")
        sp.add_argument("--mmproj", help="its projector GGUF")
        add_arguments(sp, EngineConfig, ENGINE_FLAGS)
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    lat = sub.add_parser("latency", help="time questions: encode, prefill, decode, first token, total, memory")
    model_args(lat)
    lat.add_argument("--data", help="questions (.jsonl or .tsv); default: the shipped example questions")
    lat.add_argument("--search", default="greedy", help=SEARCH_HELP)
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--limit", type=int, default=5, help="questions to time (default %(default)s)")
    lat.add_argument("--compare-reference", action="store_true",
                     help="also time the paper-style implementation (every call re-evaluates prompt and image)")
    add_arguments(lat, SearchConfig, BUDGETS)
    lat.add_argument("--compare-greedy", action="store_true",
                     help="also time greedy decoding on each question right after the search, and report the "
                     "median of the paired ratios (x greedy)")

    bat = sub.add_parser("batching", help="ms per decode step with 1, 2, 4, 8 parallel sequences, and prefill speed",
                         description="How a decode step's cost grows with parallel sequences (stage search decodes "
                         "its N candidates as N sequences): about 1x one row when memory-bound (large models), "
                         "about Nx when compute-bound (tiny models). Needs only the text model.")
    bat.add_argument("--model", help="text model GGUF (default: the shipped model)")
    bat.add_argument("--random", metavar="WIDTHxLAYERS",
                     help="measure a random-weight Llama of this size instead (e.g. 2048x12, ~0.5 B parameters: "
                     "how a laptop-size model behaves; needs ~2 bytes per parameter of temporary disk)")
    add_arguments(bat, EngineConfig, ("n_threads", "flash_attn"))
    bat.add_argument("--rows", type=lambda s: tuple(int(x) for x in _csv(s)), default=(1, 2, 4, 8),
                     help="parallel sequences per step (default 1,2,4,8)")
    bat.add_argument("--prefix", type=int, default=256, help="shared prefix tokens (default %(default)s)")
    bat.add_argument("--steps", type=int, default=64, help="timed steps per row count (default %(default)s)")
    bat.add_argument("--json", action="store_true", help="print one JSON object")

    pe = sub.add_parser("peer", help="against llama-cpp-python's own chat API: process time, decode speed, same tokens",
                        description="The same GGUF pair, image and question through llavao1-edge and through "
                        "llama-cpp-python's Llama.create_chat_completion (MTMDChatHandler): the wall time of a whole "
                        "`llavao1-edge run --search greedy` process against the peer's script, alternating, and in one "
                        "process the greedy tokens each generates (they must be equal) and their decode speed.")
    model_args(pe)
    pe.add_argument("--data", help="questions (.jsonl or .tsv); default: the shipped example questions")
    pe.add_argument("--limit", type=int, default=3, help="questions (default %(default)s)")
    pe.add_argument("--repeats", type=int, default=5, help="processes of each per question (default %(default)s)")
    pe.add_argument("--what", choices=("both", "process", "decode"), default="both")

    acc = sub.add_parser("accuracy", help="exact match of the CONCLUSION, per category, with a 95%% interval")
    model_args(acc)
    acc.add_argument("--data", required=True, help="LLaVA-CoT .jsonl or VLMEvalKit .tsv")
    acc.add_argument("--search", default="greedy", help=SEARCH_HELP)
    acc.add_argument("--limit", type=int)

    cmp = sub.add_parser("compare", help="two accuracy reports question by question: fixed, broken, McNemar's p",
                         description="Pairs two accuracy reports on the same questions: how many questions B gets "
                         "right that A gets wrong (fixed) and the reverse (broken), overall and per category, and "
                         "McNemar's exact p (how often a split that uneven comes from two equally good settings). "
                         "Reports come from llavao1-bench accuracy --json, or from a sweep as RESULTS.json#CELL, "
                         "e.g. 'sweep/results.json#gguf|F16|F16|stage:4' (quote it for the shell).")
    cmp.add_argument("a", metavar="A", help="the baseline report")
    cmp.add_argument("b", metavar="B", help="the report compared with it")
    cmp.add_argument("--json", action="store_true", help="print one JSON object (with the fixed and broken ids)")

    srv = sub.add_parser("serve", help="the local server under load: latency and throughput, overhead per request",
                         description="Start `llavao1-edge serve` and send it the questions (OpenAI chat completions, "
                         "the image as a data: URI) from 1, 2, 4 and 8 clients at once: latency p50/p95 and "
                         "throughput; then the server's overhead per request against Reasoner.ask on the same "
                         "questions. Needs the server extra.")
    model_args(srv)
    srv.add_argument("--data", help="questions (.jsonl or .tsv); default: the shipped example questions")
    srv.add_argument("--limit", type=int, default=8, help="questions (default %(default)s)")
    srv.add_argument("--search", default="greedy", help=SEARCH_HELP)
    srv.add_argument("--parallel", type=int, default=1, help="the server's --parallel (default %(default)s)")
    srv.add_argument("--clients", type=lambda s: tuple(int(x) for x in _csv(s)), default=(1, 2, 4, 8),
                     help="concurrent clients per level (default 1,2,4,8)")
    srv.add_argument("--requests", type=int, default=16, help="requests per level (default %(default)s)")
    rm = sub.add_parser("random-model", help="a published model's shape with random weights, as a GGUF pair",
                        description="Build a random-weight checkpoint of a published shape offline, write it with our "
                        "exporter and quantize the text model: what a model of that size costs here (speed and "
                        "memory), to measure with `latency`. Needs the export extra and ~3x the F16 size of disk.")
    rm.add_argument("shape", choices=("qwen2vl-2b",))
    rm.add_argument("--out", required=True, help="folder for the pair")
    rm.add_argument("--quant", default="Q4_K_M", help="the text model's type (default %(default)s)")
    rm.add_argument("--keep-checkpoint", action="store_true", help="keep the Hugging Face checkpoint (bf16) in "
                    "OUT/SHAPE-hf, e.g. to measure fine-tuning")
    sw = sub.add_parser("sweep", help="accuracy and latency over quantization types x search settings")
    sw.add_argument("--data", required=True)
    sw.add_argument("--gguf", help="F16/F32 text GGUF to quantize from")
    sw.add_argument("--mmproj", help="its projector GGUF")
    sw.add_argument("--checkpoint", help="or a Hugging Face checkpoint folder (adds ONNX and transformers rows)")
    sw.add_argument("--quants", type=_csv, default=("F16", "Q8_0", "Q4_K_M"))
    sw.add_argument("--mmproj-quants", type=_csv, default=("F16",))
    sw.add_argument("--search", type=_csv, default=("greedy", "stage:2"), help="comma-separated; each " + SEARCH_HELP)
    sw.add_argument("--onnx-quants", type=_csv, default=("none", "int8", "int4"), help="with --checkpoint")
    sw.add_argument("--limit", type=int)
    sw.add_argument("--out", required=True)
    sw.add_argument("--threads", type=int, default=0)
    sw.add_argument("-q", "--quiet", action="store_true")
    return p


def _model_paths(args) -> tuple[str, str]:
    from llavao1_edge.api import shipped_model_paths

    from .common import check_model_files

    if args.model or args.mmproj:
        check_model_files(args.model, args.mmproj)
        return args.model, args.mmproj
    text, proj = shipped_model_paths()
    return str(text), str(proj)


def _default_questions(limit: int):
    from llavao1_edge.api import MODELS_DIR

    from .common import BenchError, load_items

    examples = MODELS_DIR.parent / "examples" / "questions.jsonl"
    if not examples.is_file():
        raise BenchError("no --data given and no shipped example questions found")
    return load_items(examples, limit)


def _random_size(spec: str) -> tuple[int, int]:
    from .common import BenchError

    try:
        width, layers = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise BenchError(f"--random {spec!r}: expected WIDTHxLAYERS, e.g. 2048x12") from None
    if width < 64 or width % 64 or not 1 <= layers <= 200:
        raise BenchError(f"--random {spec!r}: width must be a multiple of 64, layers 1..200")
    return width, layers


def _batching(args) -> int:
    from llavao1_edge.api import shipped_model_paths
    from llavao1_edge.engine import Engine

    from .batching import BatchingConfig, measure_batching, write_random_llama
    from .common import BenchError

    if any(k < 1 for k in args.rows) or args.prefix < 1 or args.steps < 1:
        raise BenchError("--rows, --prefix and --steps must be positive")
    model = args.model or str(shipped_model_paths()[0])
    cfg = BatchingConfig(rows=args.rows, prefix_tokens=args.prefix, steps=args.steps)
    with tempfile.TemporaryDirectory(prefix="llavao1-batching-") as tmp:
        if args.random:  # --model (or the shipped model) only lends its tokenizer
            width, layers = _random_size(args.random)
            print(f"writing a random-weight Llama {width} wide x {layers} layers ...", file=sys.stderr)
            like, model = model, os.path.join(tmp, f"random-llama-{width}x{layers}-f16.gguf")
            write_random_llama(model, like, width, layers, ffn=width * 11 // 4 // 256 * 256,
                               heads=max(1, width // 64), kv_heads=max(1, width // 512))
        engine_cfg = from_args(EngineConfig, args)
        with Engine(model, None, cfg.engine_config(engine_cfg.n_threads, engine_cfg.flash_attn)) as engine:
            report = measure_batching(engine, cfg)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _peer(args) -> int:
    from dataclasses import asdict

    from .common import BenchError, Provenance, load_items, sha256_file
    from .peer import PeerReport, measure_decode, measure_process

    if args.limit < 1 or args.repeats < 1:
        raise BenchError("--limit and --repeats must be at least 1")
    model, mmproj = _model_paths(args)
    items = load_items(args.data, args.limit) if args.data else _default_questions(args.limit)
    threads = args.n_threads or os.cpu_count() or 1
    report = PeerReport(model, mmproj, threads)
    if args.what in ("both", "decode"):
        measure_decode(report, items, args.n_ctx)
    if args.what in ("both", "process"):
        measure_process(report, items, args.repeats, args.n_ctx)
    report.provenance = {**asdict(Provenance()), "model_sha256": sha256_file(model)}
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _serve(args) -> int:
    from dataclasses import asdict

    from llavao1_edge.options import parse_spec, spec_label

    from .common import BenchError, Provenance, load_items, sha256_file
    from .serve import measure_serve

    require_extra("llavao1-bench serve", "server", ("starlette", "uvicorn"))
    if args.limit < 1 or args.requests < 1 or args.parallel < 1 or any(c < 1 for c in args.clients):
        raise BenchError("--limit, --requests, --parallel and --clients must be positive")
    model, mmproj = _model_paths(args)
    items = load_items(args.data, args.limit) if args.data else _default_questions(args.limit)
    cfg = parse_spec(args.search)
    spec = {k: v for k, v in asdict(cfg).items() if k in ("strategy", "candidates", "selector") or
            getattr(cfg, k) != getattr(parse_spec("greedy"), k)}
    engine = from_args(EngineConfig, args)
    threads = engine.n_threads or os.cpu_count() or 1
    report = measure_serve(model, mmproj, items, spec, spec_label(cfg), args.parallel, threads, args.clients,
                           args.requests, engine)
    report.provenance = {**asdict(Provenance()), "model_sha256": sha256_file(model)}
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _run(args) -> int:
    from llavao1_edge.options import parse_spec, spec_label

    from .common import BenchError, load_items

    progress = False if getattr(args, "quiet", False) else None
    if args.command == "sweep":
        from .sweep import SweepConfig, run_sweep

        cfg = SweepConfig(args.data, args.out, args.gguf, args.mmproj, args.checkpoint, args.quants, args.mmproj_quants,
                          args.search, args.onnx_quants, args.limit, args.threads, progress)
        res = run_sweep(cfg, log=lambda s: print(s, file=sys.stderr))
        print(f"wrote {args.out}/results.csv, results.json, report.md and plots ({len(res['cells'])} cells)")
        return 0
    if args.command == "batching":
        return _batching(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "random-model":
        from .random_model import write_random_model

        for path in write_random_model(args.shape, args.out, args.quant, log=lambda s: print(s, file=sys.stderr),
                                       keep_checkpoint=args.keep_checkpoint):
            print(path)
        return 0
    if args.command == "peer":
        return _peer(args)
    if args.command == "compare":
        from .compare import compare_reports, load_accuracy

        res = compare_reports(load_accuracy(args.a), load_accuracy(args.b))
        print(json.dumps(res.to_json(), indent=2) if args.json else res.table())
        return 0
    cfg = parse_spec(args.search)
    if args.command == "latency":  # a random-weight model never ends a stage: its budgets bound the run
        cfg = replace(cfg, **{k: getattr(args, k) for k in BUDGETS})
    model, mmproj = _model_paths(args)
    items = load_items(args.data, args.limit) if args.data else _default_questions(args.limit or 5)
    from .backends import GGUFBackend

    backend = GGUFBackend(model, mmproj, from_args(EngineConfig, args, n_seq_max=17))
    try:
        if args.command == "latency":
            from .latency import run_latency

            if args.compare_reference and cfg.strategy != "stage":
                raise BenchError("--compare-reference compares stage search; use --search stage:N")
            report = run_latency(backend, items, cfg, args.repeats, args.compare_reference, spec_label(cfg), progress,
                                 compare_greedy=args.compare_greedy)
        else:
            from .accuracy import run_accuracy

            report = run_accuracy(items, lambda it: backend.answer(it, cfg), progress)
    finally:
        backend.close()
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sweep":
        require_extra("llavao1-bench", "bench", ("matplotlib",))
    from llavao1_data.records import RecordError
    from llavao1_edge.api import ModelNotFound
    from llavao1_edge.engine import EngineError
    from llavao1_edge.images import ImageError
    from llavao1_edge.modelfile import ModelFileError

    from .common import BenchError

    return run_guarded("llavao1-bench", lambda: _run(args),
                       (BenchError, RecordError, ModelFileError, ModelNotFound, ImageError, EngineError, ValueError,
                        OSError),
                       "interrupted (a sweep continues where it stopped when run again)")


if __name__ == "__main__":
    sys.exit(main())
