"""What a decode step costs as parallel sequences are added: the number that decides stage search's price.

Stage search decodes its N candidates as N sequences in one llama.cpp batch. When a step is
memory-bound (large models: every weight is read once per step whatever the batch), N rows cost
about one, and search costs little more than greedy; when it is compute-bound (tiny models whose
weights sit in cache), N rows cost nearly N times one. This measures which regime a model is in
on this machine: milliseconds per step for k rows forked from one shared prefix, and prompt
(prefill) speed for comparison. `write_random_llama` makes a laptop-size model to compare with,
offline: random weights (timing only), the shipped model's tokenizer.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field

from llavao1_edge.engine import Engine, EngineConfig

_FILLER = " the small red circle is left of the large blue square and"  # any text: only the token count matters


@dataclass
class BatchingConfig:
    rows: tuple[int, ...] = (1, 2, 4, 8)  # parallel sequences per step (1 is always measured: the unit)
    prefix_tokens: int = 256  # shared prefix each sequence is forked from (like prompt + image)
    steps: int = 64  # timed steps per row count
    repeats: int = 3  # the median of this many timings is kept

    def engine_config(self, n_threads: int = 0, flash_attn: bool | None = None) -> EngineConfig:
        """A context just large enough: every sequence appends its own cells after the shared prefix."""
        return EngineConfig(n_ctx=self.prefix_tokens + max(self.rows) * self.steps + 64, n_seq_max=max(self.rows) + 1,
                            n_threads=n_threads, flash_attn=flash_attn)


@dataclass
class BatchingReport:
    model: str
    threads: int
    flash_attn: bool | None
    prefill_tok_s: float
    rows: list[dict] = field(default_factory=list)  # {rows, ms_per_step, ms_per_row, x_one_row}

    def to_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        fa = {None: "auto", True: "on", False: "off"}[self.flash_attn]
        lines = [f"{self.model}: {self.threads} threads, flash attention {fa}; prefill {self.prefill_tok_s:.0f} tok/s",
                 "  rows  ms/step  ms/row  x one row"]
        lines += [f"  {r['rows']:>4}  {r['ms_per_step']:7.3f}  {r['ms_per_row']:6.3f}  {r['x_one_row']:9.2f}"
                  for r in self.rows]
        return "\n".join(lines)


def _filler(engine: Engine, n: int) -> list[int]:
    one = engine.tokenize(_FILLER, special=False)
    return (one * (n // len(one) + 1))[:n]


def measure_batching(engine: Engine, cfg: BatchingConfig | None = None) -> BatchingReport:
    cfg = cfg or BatchingConfig()
    ks = sorted(set(cfg.rows) | {1})
    if max(cfg.rows) + 1 > engine.config.n_seq_max:
        raise ValueError(f"{max(cfg.rows)} rows need n_seq_max >= {max(cfg.rows) + 1} (have {engine.config.n_seq_max})")
    if cfg.prefix_tokens + max(cfg.rows) * cfg.steps > engine.config.n_ctx:  # every sequence appends its own cells
        raise ValueError(f"prefix {cfg.prefix_tokens} + {max(cfg.rows)} x {cfg.steps} steps do not fit "
                         f"n_ctx {engine.config.n_ctx}")
    engine.clear_caches()
    for s in range(engine.config.n_seq_max):
        engine.drop(s)
    prefix = _filler(engine, cfg.prefix_tokens)
    prefill = []
    for _ in range(cfg.repeats):
        engine.drop(0)
        t0 = time.perf_counter()
        engine.decode_tokens(0, prefix, 0)
        prefill.append(cfg.prefix_tokens / (time.perf_counter() - t0))
    tokens = _filler(engine, cfg.steps)
    timings: dict[int, list[float]] = {k: [] for k in ks}
    for rep in range(cfg.repeats + 1):  # round 0 warms up (llama.cpp sizes its buffers per batch shape)
        for k in ks:  # row counts interleaved, so drift in machine speed hits all alike
            for q in range(1, k + 1):
                engine.fork(0, q)  # shares the prefix's cells, as candidates do
            t0 = time.perf_counter()
            for i, tok in enumerate(tokens):
                engine.step([(q, tok, cfg.prefix_tokens + i) for q in range(1, k + 1)])
            if rep:
                timings[k].append((time.perf_counter() - t0) / cfg.steps * 1e3)
            for q in range(1, k + 1):
                engine.drop(q)
    ms = {k: statistics.median(timings[k]) for k in ks}
    rows = [{"rows": k, "ms_per_step": ms[k], "ms_per_row": ms[k] / k, "x_one_row": ms[k] / ms[1]} for k in ks]
    engine.drop(0)
    return BatchingReport(engine.model_path, engine.config.n_threads, engine.config.flash_attn,
                          statistics.median(prefill), rows)


def write_random_llama(path: str | os.PathLike, like: str | os.PathLike, width: int = 2048, layers: int = 12,
                       ffn: int = 5632, heads: int = 32, kv_heads: int = 4, seed: int = 0) -> None:
    """A Llama GGUF with random F16 weights at the given widths, for timing only; metadata and
    tokenizer are copied from `like` (a llama-architecture GGUF). Written to a temporary name, then renamed."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(like)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"{like}: architecture {arch!r}; a llama GGUF is needed to copy the tokenizer from")
    dims = {"embedding_length": width, "block_count": layers, "feed_forward_length": ffn,
            "attention.head_count": heads, "attention.head_count_kv": kv_heads, "rope.dimension_count": width // heads}
    tmp = f"{path}.tmp"
    w = GGUFWriter(tmp, "llama")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        name = key.removeprefix("llama.")
        if name in dims:
            w.add_uint32(key, dims[name])
        elif f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    vocab = int(reader.fields["llama.vocab_size"].contents())
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:  # [out, in], scaled so activations stay finite
        return (rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)).astype(np.float16)

    kv = kv_heads * (width // heads)
    w.add_tensor("token_embd.weight", mat(vocab, width))
    w.add_tensor("output_norm.weight", np.ones(width, np.float32))
    w.add_tensor("output.weight", mat(vocab, width))
    for b in range(layers):
        for name, t in (("attn_norm", np.ones(width, np.float32)), ("attn_q", mat(width, width)),
                        ("attn_k", mat(kv, width)), ("attn_v", mat(kv, width)), ("attn_output", mat(width, width)),
                        ("ffn_norm", np.ones(width, np.float32)), ("ffn_gate", mat(ffn, width)),
                        ("ffn_up", mat(ffn, width)), ("ffn_down", mat(width, ffn))):
            w.add_tensor(f"blk.{b}.{name}.weight", t)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
