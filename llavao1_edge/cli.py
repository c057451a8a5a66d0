"""`llavao1-edge`: ask a vision-language model a question, reasoning in four stages.

examples:
  llavao1-edge run photo.png "How many red circles are there?"
  llavao1-edge run photo.png "Which shape is left of the blue square?" --search stage --candidates 4 -v
  llavao1-edge run photo.png "What color is the triangle?" --model m.gguf --mmproj mmproj.gguf --json
  llavao1-edge info model.gguf

models from the Hugging Face hub (a GGUF text model and its mmproj; pulled once, then opened offline):
  llavao1-edge pull ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0
  llavao1-edge run photo.png "How many objects are there?" --hf ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0
  llavao1-edge list
  llavao1-edge rm ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .options import EngineConfig, SearchConfig, add_arguments, from_args
from .stages import STAGE_BY_NAME

EXIT_USAGE = 2  # user mistakes exit with 1 (run_guarded)
HUB_HELP = ("Set HF_TOKEN for private or gated repositories and HF_ENDPOINT for a mirror; the cache is "
            "$LLAVAO1_CACHE, else the platform's cache folder + llavao1-edge/.")
# the EngineConfig fields `run`, `serve` and the bench take as flags
ENGINE_FLAGS = ("n_ctx", "n_threads", "n_gpu_layers", "flash_attn", "image_min_tokens", "image_max_tokens")


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

    sv = sub.add_parser("serve", help="a local OpenAI- and Ollama-compatible server, and a page that shows the search",
                        description="Serve the model over HTTP: OpenAI's /v1/chat/completions and /v1/models, "
                        "Ollama's /api/chat and /api/tags, /health, and at / a page to ask about an image and watch "
                        "the search choose each stage. Listens on 127.0.0.1 only unless --host says otherwise. "
                        "Needs the server extra: pip install 'llavao1-edge[server]'.",
                        epilog="examples:\n  llavao1-edge serve\n  llavao1-edge serve --hf "
                        "ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0 --parallel 2 --api-key SECRET\n"
                        "  llavao1-edge serve --search greedy --cors-origin http://localhost:3000",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(sv)
    net = sv.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine "
                     "only; 0.0.0.0 opens it to the network, so set --api-key)")
    net.add_argument("--port", type=int, default=8080, help="default %(default)s (0: any free port)")
    net.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or X-Api-Key) on every endpoint but "
                     "/health and the page (default: $LLAVAO1_API_KEY, else none)")
    net.add_argument("--alias", help="the model name clients ask for (default: the --hf name, or the file's)")
    net.add_argument("--parallel", type=int, default=1, help="requests searched at once, each in its own llama.cpp "
                     "context; the weights are loaded once (default %(default)s)")
    net.add_argument("--queue", type=int, default=8, help="requests that may wait for a free worker; beyond that "
                     "503 with Retry-After (default %(default)s)")
    net.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                     help="a browser origin allowed to call the API (repeatable); default none: no CORS headers")
    net.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default %(default)s)")
    net.add_argument("--max-image-mb", type=float, default=20.0, help="largest image file (default %(default)s)")
    net.add_argument("--max-tokens", type=int, default=4096, help="the most a request's max_tokens may ask for "
                     "(default %(default)s)")
    add_arguments(sv.add_argument_group("search (a request's defaults; its llavao1 object overrides them)"),
                  SearchConfig)
    add_arguments(sv.add_argument_group("engine"), EngineConfig, ENGINE_FLAGS)

    i = sub.add_parser("info", help="describe GGUF files, or (no file) what llama.cpp can use here",
                       description="With FILE (a text model or a projector, or both): architecture, family, how the "
                       "projector turns an image into tokens, whether the stage tags are single tokens, sizes, tensor "
                       "types and metadata. Without: the devices the installed llama.cpp can use (is the GPU used?), "
                       "CPU features and threads.")
    i.add_argument("files", nargs="*", metavar="FILE")
    i.add_argument("--json", action="store_true")

    pl = sub.add_parser("pull", help="download a model and its projector from the Hugging Face hub",
                        description="Download the GGUF text model of QUANT (default: Q4_K_M, else Q8_0, else the "
                        "first) and its mmproj from a Hugging Face repository into the cache, as llama.cpp's -hf "
                        "chooses them. An interrupted download resumes; each file is checked against the hub's "
                        "sha256. " + HUB_HELP)
    pl.add_argument("ref", metavar="REPO[:QUANT]", help="e.g. ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0")
    pl.add_argument("--cache-dir", help="the cache folder (default: $LLAVAO1_CACHE or the platform's)")
    pl.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ls = sub.add_parser("list", help="the models pulled into the cache",
                        description="Each pulled model: its files, sizes, family and tensor types (read from the "
                        "files), and whether the stage tags are single tokens of its vocabulary.")
    ls.add_argument("--cache-dir", help="the cache folder (default: $LLAVAO1_CACHE or the platform's)")
    ls.add_argument("--json", action="store_true")
    rm = sub.add_parser("rm", help="remove a pulled model from the cache",
                        description="Remove a pulled model: its files (unless another pulled quantization uses "
                        "them) and its record. Without :QUANT, every pulled quantization of REPO.")
    rm.add_argument("ref", metavar="REPO[:QUANT]")
    rm.add_argument("--cache-dir", help="the cache folder (default: $LLAVAO1_CACHE or the platform's)")
    rm.add_argument("--json", action="store_true")
    return p


class UsageError(Exception):
    """Flags that do not go together: one line and exit code 2, as argparse's own errors."""


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name a model: --model/--mmproj (files) or --hf (a hub repository), for `run` and `serve`;
    model_paths(args) resolves them."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="text model GGUF (default: the model the package ships)")
    g.add_argument("--mmproj", help="vision projector GGUF that belongs to --model")
    g.add_argument("--hf", metavar="REPO[:QUANT]", help="a Hugging Face repository with a GGUF model and its "
                   "mmproj (e.g. ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0): pulled into the cache on first use, "
                   "then opened from it without the network. " + HUB_HELP)
    g.add_argument("--offline", action="store_true", help="never use the network: an --hf model that is not in the "
                   "cache is an error (also HF_HUB_OFFLINE=1 or LLAVAO1_OFFLINE=1)")
    g.add_argument("--cache-dir", help="the cache folder for --hf (default: $LLAVAO1_CACHE or the platform's)")
    g.add_argument("-q", "--quiet", action="store_true", help="no download progress bar (--hf)")


def model_paths(args) -> tuple[str | None, str | None]:
    """The text model and projector that model_arguments' flags name: --hf pulled or found in the cache,
    --model and --mmproj as given, or (None, None) for the model the package ships."""
    if args.hf and (args.model or args.mmproj):
        raise UsageError("--hf names a model on the hub; it does not go with --model/--mmproj")
    if args.hf:
        from .hub import pull

        model = pull(args.hf, args.cache_dir, offline=True if args.offline else None,
                     progress=False if args.quiet else None)
        return str(model.text), str(model.mmproj)
    if (args.model is None) != (args.mmproj is None):
        raise UsageError("--model and --mmproj go together (a text model and the projector that belongs to it)")
    return args.model, args.mmproj


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
        print(json.dumps({"search": asdict(cfg), "engine": asdict(engine), "model": args.model, "mmproj": args.mmproj,
                          "hf": args.hf}, indent=2))
        return 0
    model, mmproj = model_paths(args)
    printer = None if args.json else _Printer(args.verbose, cfg.strategy == "greedy")
    with Reasoner(model, mmproj, engine) as r:
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


def _pull(args) -> int:
    from .hub import find_cached, pull

    if find_cached(args.ref, args.cache_dir) is not None:
        print(f"{args.ref}: in the cache already", file=sys.stderr)
    model = pull(args.ref, args.cache_dir, progress=False if args.quiet else None)
    print(f"{model.ref} (commit {model.commit[:10]})\n  text model  {model.text}\n  projector   {model.mmproj}")
    return 0


def _describe_cached(model) -> dict:
    """A cached model as `list --json` shows it: the record, and what each file's own metadata says."""
    from .modelfile import ModelFileError, describe

    doc = model.to_json()
    for role, entry in doc["files"].items():
        try:
            info = describe(model.path(role))
        except ModelFileError as e:
            entry["problem"] = str(e)
            continue
        entry.update(architecture=info.architecture, family=info.family, tensor_types=info.tensor_types)
        if role == "text":
            doc["stage_tags_single_tokens"] = info.stage_tags_single_tokens
            doc["stage_format"] = info.stage_format
        else:
            doc["family"] = info.family  # the projector names the family; a text architecture may have several
    return doc


def _list(args) -> int:
    from .hub import cache_root, cached_models

    root = cache_root(args.cache_dir)
    docs = [_describe_cached(m) for m in cached_models(root)]
    if args.json:
        print(json.dumps(docs))
        return 0
    for d in docs:
        tags = {True: "stage tags single tokens", False: "stage tags several tokens each"}
        print(f"{d['ref']}  {d['size_bytes'] / 2**20:,.1f} MiB  {d.get('family', '?')}  "
              f"{tags.get(d.get('stage_tags_single_tokens'), '')}  commit {d['commit'][:10]}"
              f"{'' if d['present'] else '  (files missing: pull it again)'}")
        for role, f in d["files"].items():
            types = ", ".join(f"{k} x{v}" for k, v in sorted(f.get("tensor_types", {}).items()))
            print(f"  {role:<7} {f['file']}  {f['size'] / 2**20:,.1f} MiB  {f.get('problem') or types}")
    on_disk = sum({f["sha256"]: f["size"] for d in docs for f in d["files"].values()}.values())  # shared once
    print(f"{len(docs)} model{'s' * (len(docs) != 1)}, {on_disk / 2**20:,.1f} MiB in {root}"
          + ("" if docs else "; pull one with: llavao1-edge pull REPO[:QUANT]"))
    return 0


def _rm(args) -> int:
    from .hub import remove

    removed, freed = remove(args.ref, args.cache_dir)
    if args.json:
        print(json.dumps({"removed": [m.to_json() for m in removed], "freed_bytes": freed}))
        return 0
    for m in removed:
        print(f"removed {m.ref} ({m.files['text'].path}, {m.files['mmproj'].path})")
    print(f"{freed / 2**20:,.1f} MiB freed")
    return 0


def _serve(args) -> int:
    import os
    from pathlib import Path

    from .extras import require_extra

    require_extra("llavao1-edge serve", "server", ("starlette", "uvicorn"))
    from .api import DEFAULT_MODEL, shipped_model_paths
    from .server.app import run
    from .server.config import API_KEY_ENV, ServerConfig

    for name in ("parallel", "queue", "max_tokens"):
        if getattr(args, name) < (0 if name == "queue" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be {'0' if name == 'queue' else '1'} or more")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    model, mmproj = model_paths(args)
    name = args.alias or args.hf or (Path(model).stem if model else DEFAULT_MODEL)
    if model is None:
        model, mmproj = (str(p) for p in shipped_model_paths())
    search = from_args(SearchConfig, args)
    search.validate()
    cfg = ServerConfig(model, mmproj, name, args.host, args.port, args.api_key or os.environ.get(API_KEY_ENV) or None,
                       args.parallel, args.queue, tuple(args.cors_origin), int(args.max_body_mb * 2**20),
                       int(args.max_image_mb * 2**20), args.max_tokens, search, from_args(EngineConfig, args))
    if not cfg.loopback and not cfg.api_key:
        print(f"llavao1-edge serve: listening on {cfg.host} without --api-key: anyone who can reach this machine "
              "can use the model", file=sys.stderr)

    def ready(url: str) -> None:
        print(f"serving {name} on {url} (page: {url}/, OpenAI: {url}/v1, Ollama: {url}/api); Ctrl-C stops",
              file=sys.stderr, flush=True)

    return run(cfg, ready)


COMMANDS = {"run": _run, "info": _info, "pull": _pull, "list": _list, "rm": _rm, "serve": _serve}


def main(argv: list[str] | None = None) -> int:
    from .api import ModelNotFound
    from .engine import EngineError
    from .extras import run_guarded
    from .images import ImageError
    from .modelfile import ModelFileError

    args = build_parser().parse_args(argv)
    try:
        return run_guarded("llavao1-edge", lambda: COMMANDS[args.command](args),
                           (ModelFileError, ImageError, ModelNotFound, EngineError, ValueError, OSError))
    except UsageError as e:
        print(f"llavao1-edge: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
