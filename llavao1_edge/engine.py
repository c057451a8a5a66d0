"""llama.cpp through llama-cpp-python's low-level and mtmd bindings: the only ctypes in the runtime.

One context holds many sequences in a unified KV cache, so candidates and judge prompts fork
from a shared prefix without copying it. Image embeddings are cached (LRU) and sequence 0
keeps the last prompt: a new prompt that starts the same way (the same image) re-decodes only
what differs. Both files are validated with the gguf reader first (modelfile.py): a bad file
raises instead of aborting the host process.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .images import ImageSource, load_image
from .modelfile import ModelFileError, chat_template, check_model_pair, has_stage_format
from .options import EngineConfig
from .prompting import ChatTemplate
from .sequences import SequencePool


class EngineError(RuntimeError):
    """llama.cpp refused or failed an operation (not a bad input file: see ModelFileError)."""


_backend_lock = threading.Lock()
_backend_ready = False
_log_callbacks: list = []  # ctypes callbacks must outlive every call into llama.cpp


def init_backend(verbose: bool = False) -> None:
    """Initialise llama.cpp once per process; unless verbose, silence its logs."""
    global _backend_ready
    import llama_cpp as L
    import llama_cpp.mtmd_cpp as M

    with _backend_lock:
        if not _backend_ready:
            L.llama_backend_init()
            _backend_ready = True
        if not verbose and not _log_callbacks:
            quiet = L.llama_log_callback(lambda level, text, user: None)
            _log_callbacks.append(quiet)
            L.llama_log_set(quiet, None)
            M.mtmd_log_set(quiet, None)
            M.mtmd_helper_log_set(quiet, None)


@contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs (the log is process-wide: one block at a time)."""
    import llama_cpp as L

    init_backend()
    lines: list[str] = []
    with _backend_lock:
        capture = L.llama_log_callback(lambda level, text, user: lines.append(text.decode("utf-8", "replace")))
        L.llama_log_set(capture, None)
        try:
            yield lines
        finally:
            L.llama_log_set(_log_callbacks[0] if _log_callbacks else None, None)


def gpu_layers(requested: int | None) -> int:
    """Layers to offload: as asked, or (None) all of them when llama.cpp was built with a GPU backend."""
    if requested is not None:
        return requested
    import llama_cpp as L

    return -1 if L.llama_supports_gpu_offload() else 0


_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "integrated GPU", 3: "accelerator"}  # enum ggml_backend_dev_type


def system_info() -> dict:
    """What the installed llama.cpp can use: its devices (CPU, Metal, CUDA, Vulkan ...), whether layers
    can be offloaded to a GPU, the CPU features it was built for, and the default thread count."""
    import importlib.metadata

    import llama_cpp as L
    from llama_cpp._ggml import libggml as G

    init_backend()
    G.ggml_backend_dev_count.restype = ctypes.c_size_t
    G.ggml_backend_dev_get.restype, G.ggml_backend_dev_get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    for fn in (G.ggml_backend_dev_name, G.ggml_backend_dev_description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    G.ggml_backend_dev_type.restype, G.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    G.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    devices = []
    for i in range(G.ggml_backend_dev_count()):
        dev = G.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        G.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append({"name": G.ggml_backend_dev_name(dev).decode(), "description": G.ggml_backend_dev_description(dev).decode(),
                        "type": _DEVICE_TYPES.get(G.ggml_backend_dev_type(dev), "other"),
                        "memory_total_mib": total.value >> 20, "memory_free_mib": free.value >> 20})
    features = L.llama_print_system_info().decode().strip().rstrip("|").strip()
    return {"llama_cpp_python": importlib.metadata.version("llama-cpp-python"), "devices": devices,
            "gpu_offload": bool(L.llama_supports_gpu_offload()), "default_gpu_layers": gpu_layers(None),
            "threads": os.cpu_count() or 1, "cpu_features": features, "cpu_amx": cpu_has_amx()}


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return " amx_tile" in f.read()
    except OSError:
        return False


@dataclass
class TextChunk:
    tokens: list[int]

    @property
    def keys(self) -> list:
        return list(self.tokens)


@dataclass
class ImageChunk:
    chunk: object  # mtmd_input_chunk* (owned copy)
    image_key: str  # sha256 of the RGB pixels and size
    index: int  # which of the image's chunks (a sliced image: its tiles in order, then the overview)
    n_tokens: int  # KV cells the chunk takes
    n_pos: int  # positions it advances (differs from n_tokens for M-RoPE models)

    @property
    def keys(self) -> list:
        return [("image", self.image_key, self.index, i) for i in range(self.n_tokens)]


@dataclass(frozen=True)
class RGBImage:
    """An image decoded once (EXIF applied, RGB) with its cache key, for prompts that reuse it
    (a search's judge prompts): no second decode or hash."""

    width: int
    height: int
    pixels: bytes  # RGB, row-major
    key: str  # sha256 of the size and pixels


@dataclass
class Prompt:
    chunks: list[TextChunk | ImageChunk]

    @property
    def keys(self) -> list:
        return [k for c in self.chunks for k in c.keys]

    @property
    def n_tokens(self) -> int:
        return sum(len(c.tokens) if isinstance(c, TextChunk) else c.n_tokens for c in self.chunks)


@dataclass
class PrefillStats:
    image_encode_s: float = 0.0
    prefill_s: float = 0.0
    tokens_evaluated: int = 0  # prompt tokens actually decoded (the rest came from the cache)
    tokens_reused: int = 0
    image_cache_hit: bool = False


@dataclass
class SeqState:
    """Where a sequence stands: its next position and the logits for its next token."""

    seq: int
    pos: int
    logits: np.ndarray = field(repr=False)


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Weights:
    """A text model and its projector, loaded once. Every Engine made on them (one per parallel worker of a
    server) has its own context and KV cache; the projector's stateful calls (tokenizing a prompt with an
    image, encoding an image) take `mtmd_lock`, one worker at a time."""

    def __init__(self, model: str | os.PathLike, mmproj: str | os.PathLike | None = None,
                 config: EngineConfig | None = None):
        import llama_cpp as L

        cfg = config or EngineConfig()
        self.model_path, self.mmproj_path = str(model), (str(mmproj) if mmproj else None)
        reader = check_model_pair(model, mmproj)  # raises ModelFileError on anything llama.cpp may abort on
        self.stage_format = has_stage_format(reader)
        self.template_source = chat_template(reader)
        del reader
        init_backend(cfg.verbose)
        self._L, self.model, self.mtmd, self.marker = L, None, None, None
        self.mtmd_lock = threading.Lock()
        self.threads = cfg.n_threads or max(1, (os.cpu_count() or 2))
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers(cfg.n_gpu_layers)
        mp.use_extra_bufts = cfg.extra_buffer_types if cfg.extra_buffer_types is not None else not cpu_has_amx()
        self.model = L.llama_model_load_from_file(self.model_path.encode(), mp)
        if not self.model:
            raise ModelFileError(f"{self.model_path}: llama.cpp could not load this model")
        try:
            self.vocab = L.llama_model_get_vocab(self.model)
            self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
            self.n_embd = L.llama_model_n_embd_inp(self.model)
            self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))  # a prompt starts with BOS
            if self.mmproj_path:
                self._init_mtmd(cfg)
        except BaseException:
            self.close()
            raise

    def _init_mtmd(self, cfg: EngineConfig) -> None:
        import llama_cpp.mtmd_cpp as M

        self.M = M
        mp = M.mtmd_context_params_default()
        mp.use_gpu = gpu_layers(cfg.n_gpu_layers) != 0
        mp.n_threads = self.threads
        mp.print_timings = False
        if cfg.flash_attn is not None:
            mp.flash_attn_type = 1 if cfg.flash_attn else 0
        mp.image_min_tokens = cfg.image_min_tokens or -1  # -1: the projector's own limits
        mp.image_max_tokens = cfg.image_max_tokens or -1
        self.mtmd = M.mtmd_init_from_file(self.mmproj_path.encode(), self.model, mp)
        if not self.mtmd:
            limits = cfg.image_min_tokens or cfg.image_max_tokens
            hint = (f" with --image-min-tokens {cfg.image_min_tokens} --image-max-tokens {cfg.image_max_tokens} "
                    "(the least may not exceed the most; Qwen2-VL's least is 8)" if limits else "")
            raise ModelFileError(f"{self.mmproj_path}: llama.cpp could not load this projector{hint}")
        self.marker = M.mtmd_default_marker().decode()

    def close(self) -> None:
        """Free the weights (after every Engine on them is closed). Safe to call twice."""
        if self.mtmd:
            self.M.mtmd_free(self.mtmd)
            self.mtmd = None
        if self.model:
            self._L.llama_model_free(self.model)
            self.model = None


class Engine:
    """A multi-sequence llama.cpp context on loaded weights (its own, or `weights` shared with other Engines).

    Not thread-safe by itself: callers serialise (llavao1_edge.api.Reasoner holds a lock).
    """

    def __init__(self, model: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None,
                 config: EngineConfig | None = None, *, weights: Weights | None = None):
        import llama_cpp as L

        self.config = cfg = config or EngineConfig()
        self._L = L
        self._ctx = self._batch = None
        self._owns_weights = weights is None
        self.weights = w = weights or Weights(model, mmproj, cfg)
        self.model_path, self.mmproj_path = w.model_path, w.mmproj_path
        self.stage_format, self.marker = w.stage_format, w.marker
        self._model, self._vocab, self._mctx = w.model, w.vocab, w.mtmd
        self._M = getattr(w, "M", None)
        self.n_vocab, self.n_embd, self.add_bos = w.n_vocab, w.n_embd, w.add_bos
        try:
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = cfg.n_ctx, cfg.n_batch, cfg.n_batch
            cp.n_seq_max, cp.kv_unified = cfg.n_seq_max, True
            cp.n_threads = cp.n_threads_batch = cfg.n_threads or w.threads
            if cfg.kv_f32:
                cp.type_k = cp.type_v = L.GGML_TYPE_F32
            if cfg.flash_attn is not None:
                cp.flash_attn_type = 1 if cfg.flash_attn else 0
            self._ctx = L.llama_init_from_model(self._model, cp)
            if not self._ctx:
                raise EngineError(f"llama.cpp could not create a context (n_ctx={cfg.n_ctx}, n_seq_max={cfg.n_seq_max})")
            self._mem = L.llama_get_memory(self._ctx)
            self._batch = L.llama_batch_init(cfg.n_batch, 0, cfg.n_seq_max)
        except BaseException:
            self.close()
            raise
        self.sequences = SequencePool(self)  # which sequences a search uses, and the KV cells they hold
        self._images: OrderedDict[str, dict[int, np.ndarray]] = OrderedDict()  # image -> chunk index -> embeddings
        self._pieces: dict[int, bytes] = {}
        eos = L.llama_vocab_eos(self._vocab)
        self.template = ChatTemplate(w.template_source, os.path.basename(self.model_path),
                                     self.detokenize([eos]) if eos >= 0 else "")
        self._seq0_keys: list = []  # what sequence 0 holds, one key per KV cell, for prefix reuse
        self._seq0_pos = 0
        self._seq0_logits: np.ndarray | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free native memory (the weights too, unless they are shared). Safe to call twice."""
        L = getattr(self, "_L", None)
        if L is None:
            return
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_owns_weights", False) and getattr(self, "weights", None) is not None:
            self.weights.close()
        self._model = self._mctx = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _alive(self) -> None:
        if not getattr(self, "_ctx", None):  # every native call goes through here: no use after close
            raise EngineError("the engine is closed")

    @property
    def has_vision(self) -> bool:
        return bool(self._mctx)

    @property
    def pos_lag(self) -> int:
        """KV cells minus positions of the prompt in sequence 0: an image chunk of an M-RoPE model (Qwen2-VL)
        takes more cells than positions, and cell budgets count cells."""
        return max(0, len(self._seq0_keys) - self._seq0_pos)

    # -- tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (special: control tokens written out are parsed as such; add_bos: BOS first,
        when the vocabulary adds one)."""
        self._alive()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self._L.llama_token * cap)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise EngineError(f"tokenize: text needs {-n} tokens, buffer held {cap}")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as text (special tokens rendered); cached per token id."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._piece(token)
        return cached

    def _piece(self, token: int) -> bytes:
        self._alive()
        buf = ctypes.create_string_buffer(64)
        n = self._L.llama_token_to_piece(self._vocab, token, buf, 64, 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._L.llama_token_to_piece(self._vocab, token, buf, -n, 0, True)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        self._alive()
        return bool(self._L.llama_vocab_is_eog(self._vocab, token))

    @staticmethod
    def text_decoder():
        """An incremental UTF-8 decoder for streaming pieces (multi-byte characters split across tokens)."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    # -- prompts with images --------------------------------------------------------------------

    @staticmethod
    def rgb_image(image: ImageSource | RGBImage) -> RGBImage:
        """Decode and validate an image once (raises ImageError naming it)."""
        if isinstance(image, RGBImage):
            return image
        img = load_image(image)
        pixels = np.asarray(img, dtype=np.uint8).tobytes()
        key = hashlib.sha256(f"{img.width}x{img.height}".encode() + pixels).hexdigest()
        return RGBImage(img.width, img.height, pixels, key)

    def prepare(self, text: str, image: ImageSource | RGBImage | None = None) -> Prompt:
        """Tokenize a whole prompt (BOS added where the vocabulary adds one); `text` holds self.marker where
        the image goes. mtmd may cut an image into several chunks (tiles and an overview), each its own."""
        self._alive()
        if image is None:
            if self.has_vision and self.marker in text:
                raise ValueError("the prompt has an image marker but no image was given")
            return Prompt([TextChunk(self.tokenize(text, add_bos=self.add_bos))])
        if not self.has_vision:
            raise ValueError(f"{self.model_path}: no projector (mmproj) loaded, so images cannot be used")
        img = self.rgb_image(image)
        M = self._M
        chunks = self._mtmd_chunks(text, img)
        try:
            out: list[TextChunk | ImageChunk] = []
            for i in range(M.mtmd_input_chunks_size(chunks)):
                ch = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n))
                    tokens = list(ptr[: n.value])
                    if any(t < 0 for t in tokens):  # mtmd looks some family tokens up in the vocabulary
                        raise ModelFileError(f"{self.model_path}: its vocabulary lacks a token mtmd puts around "
                                             f"images for this projector ({self.mmproj_path})")
                    out.append(TextChunk(tokens))
                else:
                    index = sum(isinstance(c, ImageChunk) for c in out)  # tiles and overview: each its own
                    out.append(ImageChunk(M.mtmd_input_chunk_copy(ch), img.key, index,
                                          M.mtmd_input_chunk_get_n_tokens(ch), M.mtmd_input_chunk_get_n_pos(ch)))
            return Prompt(out)
        finally:
            M.mtmd_input_chunks_free(chunks)

    def _mtmd_chunks(self, text: str, img: RGBImage):
        """mtmd's chunks (an mtmd_input_chunks*, the caller frees it) of a prompt with one image."""
        M = self._M
        bitmap = M.mtmd_bitmap_init(img.width, img.height, (ctypes.c_ubyte * len(img.pixels)).from_buffer_copy(img.pixels))
        chunks = M.mtmd_input_chunks_init()
        try:
            data = text.encode("utf-8")
            itext = M.mtmd_input_text()
            itext.text, itext.text_len, itext.add_special, itext.parse_special = data, len(data), self.add_bos, True
            bitmaps = (ctypes.c_void_p * 1)(bitmap)
            with self.weights.mtmd_lock:
                rc = M.mtmd_tokenize(self._mctx, chunks, ctypes.byref(itext), bitmaps, 1)
            if rc != 0:
                M.mtmd_input_chunks_free(chunks)
                raise ValueError(f"mtmd could not tokenize the prompt (code {rc}): it needs exactly one "
                                 f"{self.marker} marker for the image")
            return chunks
        finally:
            M.mtmd_bitmap_free(bitmap)

    def helper_eval(self, text: str, image: ImageSource | RGBImage, seq: int) -> np.ndarray:
        """The logits after a prompt evaluated by llama.cpp's own helper (mtmd_helper_eval_chunks: its
        tokenization, image encoding and positions, M-RoPE included) into sequence `seq`: the reference
        path the engine's own prompt evaluation is tested against. `seq` is cleared first."""
        self._alive()
        self.drop(seq)
        chunks = self._mtmd_chunks(text, self.rgb_image(image))
        try:
            new_pos = self._L.llama_pos(0)
            with self.weights.mtmd_lock:
                rc = self._M.mtmd_helper_eval_chunks(self._mctx, self._ctx, chunks, 0, seq, self.config.n_batch, True,
                                                     ctypes.byref(new_pos))
            if rc != 0:
                raise EngineError(f"mtmd_helper_eval_chunks failed: {self._decode_problem(rc)}")
            return np.ctypeslib.as_array(self._L.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,)).copy()
        finally:
            self._M.mtmd_input_chunks_free(chunks)

    def free_prompt(self, prompt: Prompt) -> None:
        for c in prompt.chunks:
            if isinstance(c, ImageChunk) and c.chunk:
                self._M.mtmd_input_chunk_free(c.chunk)
                c.chunk = None

    def _embeddings(self, chunk: ImageChunk, stats: PrefillStats) -> np.ndarray:
        """The projector's output for one chunk of an image, encoded once (LRU over whole images)."""
        per_chunk = self._images.setdefault(chunk.image_key, {})
        self._images.move_to_end(chunk.image_key)
        cached = per_chunk.get(chunk.index)
        if cached is not None:
            stats.image_cache_hit = True
            return cached
        t0 = time.perf_counter()
        with self.weights.mtmd_lock:  # the projector's output buffer is shared by every Engine on these weights
            rc = self._M.mtmd_encode_chunk(self._mctx, chunk.chunk)
            if rc != 0:
                raise EngineError(f"image encoding failed (code {rc})")
            ptr = self._M.mtmd_get_output_embd(self._mctx)
            embd = np.ctypeslib.as_array(ptr, shape=(chunk.n_tokens * self.n_embd,)).copy()
        stats.image_encode_s += time.perf_counter() - t0
        per_chunk[chunk.index] = embd
        while len(self._images) > self.config.image_cache:
            self._images.popitem(last=False)
        return embd

    def _plan(self, prompt: Prompt, common: int | None = None) -> tuple[int, list[tuple[TextChunk | ImageChunk, int, int]]]:
        """What of `prompt` a sequence already holds (`common`: the keys it shares with the prompt;
        default: what sequence 0's last prompt shares): (position where the shared part ends,
        [(chunk, tokens of it already held, position the chunk starts at)] to decode)."""
        keys = prompt.keys
        if common is None:
            common = _common_prefix(self._seq0_keys, keys)
        common = min(common, len(keys) - 1)  # decode at least the last token, for its logits
        cell = pos = 0
        shared_end: int | None = None
        todo = []
        for chunk in prompt.chunks:
            span = len(chunk.keys)
            keep = min(max(common - cell, 0), span)
            if isinstance(chunk, ImageChunk) and keep < span:
                keep = 0  # an image is shared whole or decoded again (from cached embeddings)
            if keep < span:
                if shared_end is None:
                    shared_end = pos + keep
                todo.append((chunk, keep, pos))
            cell += span
            pos += chunk.n_pos if isinstance(chunk, ImageChunk) else span
        if not todo or not isinstance(todo[-1][0], TextChunk):
            raise EngineError("the prompt must end with text (the generation prompt)")
        return shared_end or 0, todo

    def cells_needed(self, prompt: Prompt) -> int:
        """KV cells evaluating `prompt` with eval_forked adds: what it does not share with sequence 0."""
        _, todo = self._plan(prompt)
        return sum(len(chunk.keys) - keep for chunk, keep, _ in todo)

    def _decode_todo(self, seq: int, todo, stats: PrefillStats, last_batched: bool):
        """Decode planned chunks into `seq`; with last_batched the final text is returned undecoded."""
        logits = None
        for i, (chunk, keep, start) in enumerate(todo):
            if isinstance(chunk, ImageChunk):
                self._decode_image(chunk, start, stats, seq)
                continue
            rest = chunk.tokens[keep:]
            stats.tokens_evaluated += len(rest)
            if last_batched and i == len(todo) - 1:
                return (seq, rest, start + keep)
            logits = self.decode_tokens(seq, rest, start + keep)
        return logits

    def eval_prompt(self, prompt: Prompt) -> tuple[SeqState, PrefillStats]:
        """Evaluate `prompt` into sequence 0, reusing what sequence 0 already holds of it.

        All other sequences are cleared. Returns the state after the prompt."""
        self._alive()
        stats = PrefillStats()
        t0 = time.perf_counter()
        for s in range(1, self.config.n_seq_max):
            self.drop(s)
        keys = prompt.keys
        if keys == self._seq0_keys and self._seq0_logits is not None:  # the very same prompt again
            stats.tokens_reused = len(keys)
        else:
            shared_end, todo = self._plan(prompt)
            self.drop(0, shared_end, -1)
            logits = self._decode_todo(0, todo, stats, last_batched=False)
            stats.tokens_reused = len(keys) - stats.tokens_evaluated
            end = todo[-1]
            self._seq0_keys, self._seq0_logits = keys, logits
            self._seq0_pos = end[2] + len(end[0].tokens)
        stats.prefill_s = time.perf_counter() - t0 - stats.image_encode_s
        return SeqState(0, self._seq0_pos, self._seq0_logits.copy()), stats

    def _decode_image(self, chunk: ImageChunk, pos: int, stats: PrefillStats, seq: int = 0) -> int:
        embd = self._embeddings(chunk, stats)
        new_pos = ctypes.c_int(0)
        rc = self._M.mtmd_helper_decode_image_chunk(
            self._mctx, self._ctx, chunk.chunk, embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            pos, seq, self.config.n_batch, ctypes.byref(new_pos), self._M.mtmd_helper_post_decode_callback(), None)
        if rc != 0:
            raise EngineError(f"decoding the image failed: {self._decode_problem(rc)}")
        stats.tokens_evaluated += chunk.n_tokens
        return new_pos.value

    def clear_caches(self) -> None:
        """Forget cached image embeddings and the kept prompt: the next prompt is evaluated from scratch."""
        self._images.clear()
        self.forget_seq0()

    def rewind_seq0(self, keys: list, pos: int, logits: np.ndarray) -> None:
        """Cut sequence 0 back to the prompt it was given (generation appended past `pos`), so the
        next prompt reuses its KV cells: a follow-up question on the same image skips the image."""
        self._alive()
        self.drop(0, pos, -1)
        self._seq0_keys, self._seq0_pos, self._seq0_logits = list(keys), pos, logits.copy()

    def forget_seq0(self) -> None:
        """Sequence 0 is about to change outside eval_prompt: prefix reuse must not trust it."""
        self._seq0_keys, self._seq0_logits = [], None

    # -- sequences and decoding ------------------------------------------------------------------

    def fork(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make sequence `dst` share `src`'s cells in [p0, p1) (all by default); no copying."""
        self._L.llama_memory_seq_rm(self._mem, dst, -1, -1)
        self._L.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def drop(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self._alive()
        self._L.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def adopt(self, src: int, dst: int, p0: int) -> None:
        """Replace `dst` from position p0 on with what `src` holds there (a chosen candidate)."""
        self._L.llama_memory_seq_rm(self._mem, dst, p0, -1)
        self._L.llama_memory_seq_cp(self._mem, src, dst, p0, -1)

    def eval_forked(self, prompts: list[Prompt], seqs: list[int],
                    held: dict[int, list] | None = None) -> tuple[list[SeqState], PrefillStats]:
        """Evaluate each prompt into its own sequence, sharing the cells it starts with from
        sequence 0's last eval_prompt (the chat header and the image, for judge prompts) or from a
        `held` sequence (seq -> keys of the prompt it was given; not among `seqs`), whichever
        shares more: a knockout's next round re-reads only what differs from the round before.
        The final text of all prompts is decoded together in one batch."""
        self._alive()
        held = held or {}
        if set(held) & set(seqs):
            raise ValueError("a held sequence cannot also receive a prompt")
        stats = PrefillStats()
        t0 = time.perf_counter()
        pending = []
        for prompt, seq in zip(prompts, seqs, strict=True):
            keys = prompt.keys  # built from the chunks on every access
            # sequence 0 first: where a judge shares no more (the chat header and image), no reason to tie to it
            shares = {0: _common_prefix(self._seq0_keys, keys)}
            shares.update((s, _common_prefix(k, keys)) for s, k in held.items())
            src = max(shares, key=shares.__getitem__)  # the first of the largest: ties stay with sequence 0
            shared_end, todo = self._plan(prompt, shares[src])
            self.drop(seq)
            if shared_end:
                self._L.llama_memory_seq_cp(self._mem, src, seq, 0, shared_end)
            stats.tokens_reused += len(keys) - sum(len(c.keys) - keep for c, keep, _ in todo)
            pending.append(self._decode_todo(seq, todo, stats, last_batched=True))
        pending = self._share_common_text(pending, stats)
        logits = self.decode_many(pending)
        stats.prefill_s = time.perf_counter() - t0 - stats.image_encode_s
        return [SeqState(seq, start + len(toks), lg) for (seq, toks, start), lg in zip(pending, logits, strict=True)], stats

    def _share_common_text(self, pending: list[tuple[int, list[int], int]], stats: PrefillStats):
        """Prompts that continue the same way from the same position (judge prompts of one round share
        instruction, question and earlier stages) decode that common text once, then fork it."""
        if len(pending) < 2 or len({start for _, _, start in pending}) != 1:
            return pending
        first = pending[0][1]
        common = min(len(toks) for _, toks, _ in pending) - 1  # each keeps at least one token, for logits
        for _, toks, _ in pending[1:]:
            common = min(common, _common_prefix(toks, first))
        if common < 8:
            return pending
        seq0, start = pending[0][0], pending[0][2]
        self.decode_many([(seq0, first[:common], start)])
        for seq, _, _ in pending[1:]:
            self._L.llama_memory_seq_cp(self._mem, seq0, seq, start, start + common)
        stats.tokens_evaluated -= common * (len(pending) - 1)
        return [(seq, toks[common:], start + common) for seq, toks, _ in pending]

    def _run_batch(self, rows: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """rows: (token, pos, seq, want_logits); returns logits for rows that want them."""
        b = self._batch
        for i, (tok, pos, seq, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        rc = self._L.llama_decode(self._ctx, b)
        if rc != 0:
            raise EngineError(f"llama_decode failed: {self._decode_problem(rc)}")
        n_out = sum(1 for r in rows if r[3])
        if n_out == 0:
            return []
        # Outputs are stored contiguously in batch order: one copy for the whole batch.
        block = np.ctypeslib.as_array(self._L.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab)).copy()
        return list(block)

    def _decode_problem(self, rc: int) -> str:
        """What llama_decode's return code means (llama.h: 1 no KV slot, 2 aborted, -1 invalid input)."""
        if rc == 1:
            return (f"no room in the KV cache (n_ctx={self.config.n_ctx}); raise n_ctx or lower the candidates "
                    "or token budgets")
        if rc == 2:
            return "aborted"
        if rc == -1:
            return (f"invalid input batch (code -1): a token id outside the vocabulary of {self.n_vocab} or a "
                    "position out of order")
        return f"code {rc} (llama.cpp's error; its log says more with verbose=True)"

    def decode_tokens(self, seq: int, tokens: list[int], pos: int) -> np.ndarray:
        """Append tokens to one sequence from position `pos`; logits after the last one."""
        return self.decode_many([(seq, tokens, pos)])[0]

    def decode_many(self, items: list[tuple[int, list[int], int]]) -> list[np.ndarray]:
        """Append token lists to several sequences at once, packed into as few decodes as fit.

        items: (seq, tokens, start_pos). Returns the logits after each item's last token."""
        self._alive()
        rows = [(tok, pos + j, seq, j == len(toks) - 1) for seq, toks, pos in items for j, tok in enumerate(toks)]
        out: list[np.ndarray] = []
        step = self.config.n_batch
        for i in range(0, len(rows), step):
            out += self._run_batch(rows[i:i + step])
        return out

    def score(self, seq: int, tokens: list[int], pos: int) -> np.ndarray:
        """Append tokens to a sequence and return the logits after every one: [len(tokens), n_vocab]."""
        self._alive()
        rows = [(tok, pos + j, seq, True) for j, tok in enumerate(tokens)]
        out: list[np.ndarray] = []
        for i in range(0, len(rows), self.config.n_batch):
            out += self._run_batch(rows[i:i + self.config.n_batch])
        return np.stack(out)

    def image_embeddings(self, prompt: Prompt) -> list[np.ndarray]:
        """The projector's output for each of the prompt's image chunks, [n_tokens, n_embd] each."""
        return [self._embeddings(c, PrefillStats()).reshape(c.n_tokens, self.n_embd)
                for c in prompt.chunks if isinstance(c, ImageChunk)]

    def step(self, entries: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """One token for each of several sequences: entries (seq, token, pos) -> logits each."""
        self._alive()
        return self._run_batch([(tok, pos, seq, True) for seq, tok, pos in entries])
