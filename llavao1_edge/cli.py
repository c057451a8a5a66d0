"""`llavao1-edge`: ask a vision-language model a question, reasoning in four stages.

examples:
  llavao1-edge run photo.png "How many red circles are there?"
  llavao1-edge run photo.png "Which shape is left of the blue square?" --search stage --candidates 4 -v
  llavao1-edge run photo.png "What color is the triangle?" --model m.gguf --mmproj mmproj.gguf --json
  llavao1-edge info model.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .options import EngineConfig, SearchConfig, add_arguments, from_args
from .stages import STAGE_BY_NAME

EXIT_USAGE = 2  # user mistakes exit with 1 (run_guarded)
ENGINE_FLAGS = ("n_ctx", "n_threads", "n_gpu_layers", "flash_attn")  # EngineConfig fields `run` and `serve` take


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llavao1-edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="answer a question about an image",
                       description="Answer QUESTION about IMAGE. Stages are printed as they are chosen.")
    r.add_argument("image", help="image file (PNG, JPEG, ...)")
    r.add_argument("question")
    model_arguments(r)
    add_arguments(r.add_argument_group("search"), SearchConfig)
    add_arguments(r.add_argument_group("engine"), EngineConfig, ENGINE_FLAGS)
    r.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    r.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    r.add_argument("-v", "--verbose", action="store_true", help="also show candidates, verdicts and timings")

    i = sub.add_parser("info", help="describe GGUF files, or (no file) what llama.cpp can use here",
                       description="With FILE (a text model or a projector, or both): architecture, family, how the "
                       "projector turns an image into tokens, whether the stage tags are single tokens, sizes, tensor "
                       "types and metadata. Without: the devices the installed llama.cpp can use (is the GPU used?), "
                       "CPU features and threads.")
    i.add_argument("files", nargs="*", metavar="FILE")
    i.add_argument("--json", action="store_true")
    return p


def model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="text model GGUF (default: the model the package ships)")
    parser.add_argument("--mmproj", help="vision projector GGUF that belongs to --model")


def engine_config(args, search: SearchConfig) -> EngineConfig:
    """The engine flags, with room for the search's sequences (candidates + their judge prompts)."""
    return from_args(EngineConfig, args, n_seq_max=max(16, 2 * search.candidates + 1))


class _Printer:
    """Writes the stages to the terminal as they are chosen; -v adds candidates and verdicts."""

    def __init__(self, verbose: bool, greedy: bool):
        self.verbose, self.greedy = verbose, greedy
        self.stage = None

    def __call__(self, ev) -> None:
        out, err = sys.stdout, sys.stderr
        if self.greedy and ev.kind == "token":
            out.write(ev.text)
            out.flush()
        elif ev.kind == "stage_chosen" and not self.greedy:
            label = STAGE_BY_NAME[ev.stage].tag if ev.stage in STAGE_BY_NAME else ev.stage.upper()
            text = ev.data.get("stage_text", ev.text.strip())
            out.write(f"{label:<11} {text}\n")
            out.flush()
        elif self.verbose and ev.kind == "candidate_finished":
            err.write(f"  [{ev.stage or 'answer'} #{ev.candidate}] ({ev.data['finish']}, "
                      f"logprob {ev.data['mean_logprob']:.2f}) {ev.text.strip()[:160]}\n")
        elif self.verbose and ev.kind == "judge_decision":
            d = ev.data
            err.write(f"  judge {ev.stage}: #{d['first']} vs #{d['second']} -> #{d['winner']}: {d['verdict'].strip()[:160]}\n")


def _run(args) -> int:
    from .api import Reasoner

    cfg = from_args(SearchConfig, args)
    engine = engine_config(args, cfg)
    if args.print_config:
        print(json.dumps({"search": asdict(cfg), "engine": asdict(engine), "model": args.model, "mmproj": args.mmproj},
                         indent=2))
        return 0
    if (args.model is None) != (args.mmproj is None):
        print("llavao1-edge: --model and --mmproj go together (a text model and the projector that belongs to it)",
              file=sys.stderr)
        return EXIT_USAGE
    printer = None if args.json else _Printer(args.verbose, cfg.strategy == "greedy")
    with Reasoner(args.model, args.mmproj, engine) as r:
        result = r.ask(args.image, args.question, cfg, on_event=printer)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
        return 0
    if cfg.strategy == "greedy":
        print()
    if result.flags:
        print(f"note: {'; '.join(result.flags)}", file=sys.stderr)
    print(f"answer: {result.answer if result.answer is not None else '(no CONCLUSION stage)'}")
    if args.verbose:
        t = result.timings
        print(f"time {t['total_s']:.2f} s (image {t.get('image_encode_s', 0):.2f}, prefill {t.get('prefill_s', 0):.2f}, "
              f"decode {t.get('decode_s', 0):.2f}, judge {t.get('judge_s', 0):.2f}); tokens {result.tokens}",
              file=sys.stderr)
    return 0


def _system(args) -> int:
    from .engine import system_info

    info = system_info()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"llama-cpp-python {info['llama_cpp_python']}")
    for d in info["devices"]:
        print(f"  device        {d['name']} ({d['type']}): {d['description']}, {d['memory_total_mib']:,} MiB")
    gpu = (f"yes: --gpu-layers defaults to all ({info['default_gpu_layers']})" if info["gpu_offload"] else
           "no: this build has no GPU backend (see docs/install.md to build one); everything runs on the CPU")
    print(f"  GPU offload   {gpu}")
    print(f"  threads       {info['threads']} (the default for --threads)")
    print(f"  CPU features  {info['cpu_features']}")
    return 0


def _info(args) -> int:
    from .modelfile import describe

    if not args.files:
        return _system(args)
    if len(args.files) > 2:
        raise ValueError("info takes a text model, a projector, or both")
    infos = [describe(f) for f in args.files]
    if args.json:
        print(json.dumps([i.to_json() for i in infos] if len(infos) > 1 else infos[0].to_json(), default=str))
        return 0
    for info in infos:
        mib = info.size_bytes / 2**20
        print(f"{info.path}\n  architecture  {info.architecture}\n  family        {info.family}\n"
              f"  name          {info.name}\n"
              f"  size          {mib:.1f} MiB, {info.n_params:,} parameters in {info.n_tensors} tensors")
        print("  tensor types  " + ", ".join(f"{k} x{v}" for k, v in sorted(info.tensor_types.items())))
        if info.is_projector:
            print(f"  image tokens  {info.image_tokens}")
        else:
            print(f"  four stages   {'yes (trained on the LLaVA-CoT format)' if info.stage_format else 'no (the runtime will force the tags)'}")
            print(f"  stage tags    {'single tokens' if info.stage_tags_single_tokens else 'several tokens each'}")
            print(f"  chat template {'yes' if info.chat_template else 'no'}")
        for k, v in info.facts.items():
            print(f"  {k:<13} {v}" if len(k) <= 13 else f"  {k} {v}")
        for k, v in info.metadata.items():
            print(f"  {k} {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .api import ModelNotFound
    from .engine import EngineError
    from .extras import run_guarded
    from .images import ImageError
    from .modelfile import ModelFileError

    args = build_parser().parse_args(argv)
    return run_guarded("llavao1-edge", lambda: _run(args) if args.command == "run" else _info(args),
                       (ModelFileError, ImageError, ModelNotFound, EngineError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
