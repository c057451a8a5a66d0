"""The search and engine settings, declared once: their defaults, command-line flags, bench spec strings
and request fields are all read from the dataclass fields below.

    SearchConfig / EngineConfig     the settings (a field's metadata holds its flag and help)
    add_arguments(parser, Config)   the flags of `llavao1-edge run` / `serve` and `llavao1-bench`
    from_args(Config, args)         flags -> settings
    from_mapping(SearchConfig, d)   a request's fields -> settings (unknown or mistyped fields: ValueError)
    parse_spec("stage:4:judge+swap") / spec_label(cfg)   the bench's compact spelling
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields, replace

STRATEGIES = ("greedy", "stage", "best-of-n", "sentence")
SELECTORS = ("judge", "logprob", "vote")
FLASH_ATTN = {"auto": None, "on": True, "off": False}  # flag spelling -> EngineConfig.flash_attn


def opt(default, flag: str, help: str, *, short: str | None = None, choices=None, spec: str | None = None,
        cli_map: dict | None = None):
    """A settings field: its default, its flag (with `short`), help text, and for booleans the bench spec
    suffix that sets the opposite of the default (`spec`). `cli_map`: flag spelling -> field value."""
    meta = {"flag": flag, "help": help, "short": short, "choices": choices, "spec": spec, "cli_map": cli_map}
    return field(default=default, metadata=meta)


@dataclass
class SearchConfig:
    strategy: str = opt("stage", "--search", "greedy: no search; stage: LLaVA-CoT stage-level beam search; best-of-n: "
                        "N whole answers; sentence: sentence-level beam search", choices=STRATEGIES)
    candidates: int = opt(4, "--candidates", "N: samples per stage (stage), answers (best-of-n) or sentences "
                          "(sentence)", short="-n")
    # logprob by default: on the shipped model the paper's judge picks below greedy (docs/shapes-tiny.md)
    selector: str = opt("logprob", "--selector", "logprob: mean token log-probability; judge: the model judges pairs "
                        "(the paper's); vote: majority over conclusions, earlier stages by logprob", choices=SELECTORS)
    temperature: float = opt(0.6, "--temperature", "candidate sampling temperature (the paper's 0.6)")
    top_p: float = opt(0.9, "--top-p", "nucleus sampling for candidates")
    greedy_candidate: bool = opt(False, "--greedy-candidate", "decode candidate 1 greedily and sample the others, "
                                 "so the selector can keep greedy's text", spec="greedy")
    judge_temperature: float = opt(0.0, "--judge-temperature", "verdict sampling (0: greedy, deterministic)")
    max_stage_tokens: int = opt(512, "--max-stage-tokens", "token budget per stage (stage, sentence)")
    max_answer_tokens: int = opt(2048, "--max-answer-tokens", "token budget for a whole answer (greedy, best-of-n)")
    max_judge_tokens: int = opt(64, "--max-judge-tokens", "token budget per verdict")
    draft_verdicts: bool = opt(True, "--draft-verdicts", "decode greedy verdicts several tokens a step where earlier "
                               "verdicts predict them (same verdicts, fewer steps)", spec="nodraft")
    judge_both_orders: bool = opt(False, "--judge-both-orders", "ask the judge about each pair twice, swapped; a "
                                  "split verdict goes to the likelier candidate (twice the judging)", spec="swap")
    reasoning_check: bool = opt(True, "--reasoning-check", "the paper's text-only correctness check of each "
                                "REASONING candidate before their knockout", spec="nocheck")
    seed: int = opt(0, "--seed", "random seed: the same seed gives the same answer")
    force_format: bool | None = opt(None, "--force-format", "instruct the four-stage format and force each opening "
                                    "tag (default: only for models without llavao1 stage metadata)")
    timeout_s: float | None = opt(None, "--timeout", "stop after this many seconds and return what is done, flagged")

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {', '.join(SELECTORS)}, got {self.selector!r}")
        if not 1 <= self.candidates <= 64:
            raise ValueError(f"candidates must be in 1..64, got {self.candidates}")
        if self.temperature < 0 or self.judge_temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperatures must be >= 0 and top_p in (0, 1]")
        for name in ("max_stage_tokens", "max_answer_tokens", "max_judge_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout must be positive")


@dataclass
class EngineConfig:
    n_ctx: int = opt(4096, "--ctx", "KV cache cells shared by the prompt, every candidate and the judges")
    n_batch: int = 512  # tokens per llama_decode call
    n_seq_max: int = 16  # parallel sequences: 1 main + candidates / judge prompts
    n_threads: int = opt(0, "--threads", "CPU threads (0: all cores)")
    n_gpu_layers: int | None = opt(None, "--gpu-layers", "layers offloaded to the GPU (Metal, CUDA, Vulkan); -1: all. "
                                   "Default: all when llama.cpp was built with a GPU backend, none otherwise")
    kv_f32: bool = False  # F32 KV cache: exact parity with transformers (default F16: half the memory)
    flash_attn: bool | None = opt(None, "--flash-attn", "llama.cpp flash attention (auto: llama.cpp decides)",
                                  choices=tuple(FLASH_ATTN), cli_map=FLASH_ATTN)
    image_cache: int = 8  # encoded images kept (LRU)
    image_min_tokens: int | None = opt(None, "--image-min-tokens", "dynamic-resolution towers (Qwen2-VL): fewest "
                                       "tokens an image becomes (default: the model's, 8 for Qwen2-VL)")
    image_max_tokens: int | None = opt(None, "--image-max-tokens", "dynamic-resolution towers: most tokens an image "
                                       "becomes, what bounds time and memory per image (default: the model's, 4096 "
                                       "for Qwen2-VL)")
    # llama.cpp's extra CPU buffer types (weight repacking, AMX). None: off when the CPU advertises AMX, whose
    # kernels raise SIGILL (`tilezero`) on VMs that report but do not run AMX.
    extra_buffer_types: bool | None = None
    verbose: bool = False  # let llama.cpp print its logs


def _flagged(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("flag")]


def _default(f):
    return f.default if f.default is not MISSING else f.default_factory()


def add_arguments(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None,
                  defaults: dict | None = None) -> None:
    """Add the flags of `cls`'s fields (or of the fields named in `only`); `defaults` overrides some."""
    for f in _flagged(cls):
        if only is not None and f.name not in only:
            continue
        m, default = f.metadata, (defaults or {}).get(f.name, _default(f))
        names = [m["flag"]] + ([m["short"]] if m["short"] else [])
        if m["cli_map"]:  # flag spellings for values ("auto" -> None)
            spelled = next(k for k, v in m["cli_map"].items() if v == default)
            parser.add_argument(*names, dest=f.name, choices=m["choices"], default=spelled,
                                help=f"{m['help']} (default %(default)s)")
        elif isinstance(default, bool) or f.type in ("bool", "bool | None"):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=m["help"])
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}[f.type]
            parser.add_argument(*names, dest=f.name, type=kind, choices=m["choices"], default=default,
                                help=m["help"] + (" (default %(default)s)" if default is not None else ""))


def from_args(cls, args: argparse.Namespace, **extra):
    """Settings from parsed flags (fields whose flag the parser did not declare keep their defaults)."""
    values = {}
    for f in _flagged(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            values[f.name] = f.metadata["cli_map"][value] if f.metadata["cli_map"] else value
    cfg = cls(**values, **extra)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def from_mapping(cls, values: dict, base=None):
    """Settings from a request's fields (names as the dataclass spells them); ValueError for an unknown
    field or a value of the wrong type."""
    known = {f.name: f for f in fields(cls)}
    out = {}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(f.name for f in _flagged(cls))}")
        kind = known[name].type
        optional = kind.endswith("| None")
        types = _JSON_TYPES[kind.removesuffix(" | None")]
        if (value is None and not optional) or (value is not None and (not isinstance(value, types)
                                                                       or (isinstance(value, bool) and bool not in types))):
            raise ValueError(f"setting {name!r} must be {kind.replace(' | None', ' or null')}, got {value!r}")
        out[name] = value
    cfg = replace(base or cls(), **out)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# -- the bench's spelling: STRATEGY[:N[:SELECTOR]][+OPTION...] ------------------------------------

SPEC_OPTIONS = {f.metadata["spec"]: (f.name, not _default(f)) for f in fields(SearchConfig) if f.metadata.get("spec")}
SPEC_HELP = ("greedy | stage:N | best-of-n:N | sentence:N, then :" + "|:".join(SELECTORS) + " (default: the runtime's, "
             f"{SearchConfig.selector}), then " + ", ".join(
                 f"+{spec} ({next(f for f in fields(SearchConfig) if f.name == name).metadata['flag']}"
                 f"{'' if value else ' off'})" for spec, (name, value) in SPEC_OPTIONS.items())
             + "; e.g. stage:4:judge+swap")


def parse_spec(spec: str) -> SearchConfig:
    """'greedy', 'stage:4', 'best-of-n:4:vote', 'stage:4:judge+greedy+swap' -> a SearchConfig. Whatever the
    spec leaves out is SearchConfig's default, as for `llavao1-edge run`."""
    base, *options = spec.strip().split("+")
    parts = base.split(":")
    strategy = parts[0]
    if strategy not in STRATEGIES:
        raise ValueError(f"search setting {spec!r}: strategy must be one of {', '.join(STRATEGIES)}")
    if len(parts) > 3:
        raise ValueError(f"search setting {spec!r}: expected STRATEGY[:N[:SELECTOR]][+OPTION...]")
    cfg = SearchConfig(strategy=strategy, candidates=1 if strategy == "greedy" else SearchConfig.candidates)
    if len(parts) > 1:
        if not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"search setting {spec!r}: the candidate count must be a positive integer")
        cfg.candidates = int(parts[1])
    if len(parts) > 2:
        if parts[2] not in SELECTORS:
            raise ValueError(f"search setting {spec!r}: selector must be one of {', '.join(SELECTORS)}")
        cfg.selector = parts[2]
    for o in options:
        if o not in SPEC_OPTIONS:
            raise ValueError(f"search setting {spec!r}: unknown option +{o}; known: "
                             + ", ".join(f"+{k}" for k in SPEC_OPTIONS))
        if strategy not in ("stage", "best-of-n"):
            raise ValueError(f"search setting {spec!r}: +{o} applies to stage and best-of-n")
        setattr(cfg, *SPEC_OPTIONS[o])
    return cfg


def spec_label(cfg: SearchConfig) -> str:
    """The spec of a SearchConfig, the selector always named: 'stage:4:judge+swap'."""
    if cfg.strategy == "greedy":
        return "greedy"
    return (f"{cfg.strategy}:{cfg.candidates}:{cfg.selector}"
            + "".join(f"+{o}" for o, (name, value) in SPEC_OPTIONS.items() if getattr(cfg, name) == value))
