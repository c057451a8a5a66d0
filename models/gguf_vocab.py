"""A Hugging Face fast tokenizer as GGUF tokenizer keys, so llama.cpp tokenizes exactly as transformers does.

Special tokens, whether BOS/EOS are added (tokenizer_config.json or the post-processor of
tokenizer.json, as Llama tokenizers do), merges and the chat template are read by the `gguf`
package's own `SpecialVocab`, the way llama.cpp's converter reads them. The vocabulary, its token
types and the pre-tokenizer name are ours.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
from gguf import GGUFValueType as T
from gguf import Keys

from .checkpoint import Checkpoint, CheckpointError
from .gguf_plan import PlannedFile

# special token kind (SpecialVocab) -> the key llama.cpp reads its id from
_SPECIAL_ID_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
                    "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID, "mask": Keys.Tokenizer.MASK_ID,
                    "eot": Keys.Tokenizer.EOT_ID, "eom": Keys.Tokenizer.EOM_ID}
_ADD_KEYS = {"bos": Keys.Tokenizer.ADD_BOS, "eos": Keys.Tokenizer.ADD_EOS, "sep": Keys.Tokenizer.ADD_SEP}

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")  # Qwen2's tokenizer.json Split regex
# tokenizers' Split pre-tokenizer regexes -> llama.cpp's pre-tokenizer name (src/llama-vocab.cpp)
_SPLIT_PATTERNS = {QWEN2_SPLIT: "qwen2"}


def pre_tokenizer_name(tok: dict, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"  # SmolLM's: each digit alone, then GPT-2's split
        splits = [p for p in parts if p.get("type") == "Split"]
        byte_level = [p for p in parts if p.get("type") == "ByteLevel" and not p.get("use_regex", True)]
        if len(splits) == 1 and byte_level and splits[0].get("pattern", {}).get("Regex") in _SPLIT_PATTERNS:
            return _SPLIT_PATTERNS[splits[0]["pattern"]["Regex"]]
    raise CheckpointError(f"{where}: pre-tokenizer {pre.get('type', 'none')!r} is not supported; supported: byte-level "
                          "BPE with GPT-2's, SmolLM's or Qwen2's split")


def _is_spm_bpe(tok: dict) -> bool:
    """SentencePiece-style BPE as transformers writes Llama-2 tokenizers: byte fallback, '▁' for spaces."""
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _spm_space_prefix(tok: dict) -> bool:
    """Whether text gets a leading '▁' (llama.cpp's add_space_prefix), from the normalizer or Metaspace."""
    def walk(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Prepend" and node.get("prepend") == "▁":
            return True
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
        return any(walk(n) for n in node.get("normalizers", []) + node.get("pretokenizers", []))
    return walk(tok.get("normalizer")) or walk(tok.get("pre_tokenizer"))


def plan_tokenizer(plan: PlannedFile, ckpt: Checkpoint, n_vocab: int) -> None:
    """Add the tokenizer keys of `ckpt` (vocabulary padded to the model's n_vocab rows) to a text plan."""
    tok, where = ckpt.tokenizer, ckpt.path / "tokenizer.json"
    model = tok.get("model") or {}
    spm = _is_spm_bpe(tok)
    if model.get("type") != "BPE" or (not spm and (tok.get("decoder") or {}).get("type") != "ByteLevel"):
        raise CheckpointError(f"{where}: tokenizer model {model.get('type')!r} is not supported; supported: "
                              "byte-level BPE (gpt2) and SentencePiece-style BPE with byte fallback (llama)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise CheckpointError(f"{where}: token id {max(vocab.values())} is beyond the model's vocabulary ({n_vocab})")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    if len(set(tokens)) != len(tokens):  # duplicate strings abort llama.cpp's vocab loader
        raise CheckpointError(f"{where}: duplicate token strings in the vocabulary")
    special = gguf.SpecialVocab(ckpt.path, load_merges=not spm, n_vocab=n_vocab)
    if spm:
        # llama.cpp's SPM tokenizer merges the pair whose result scores highest: score = -merge rank
        # reproduces the BPE merge order; bytes are BYTE tokens for the fallback.
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        scores = [0.0] * n_vocab
        for rank, merge in enumerate(merges):
            i = vocab.get(merge.replace(" ", ""))
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(rank + 1)
        for text, i in vocab.items():
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) and i not in added:
                types[i] = int(gguf.TokenType.BYTE)
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
        plan.kv(Keys.Tokenizer.MODEL, T.STRING, "llama")
        plan.kv(Keys.Tokenizer.LIST, T.ARRAY, tokens, T.STRING)
        plan.kv(Keys.Tokenizer.SCORES, T.ARRAY, scores, T.FLOAT32)
        plan.kv(Keys.Tokenizer.TOKEN_TYPE, T.ARRAY, types, T.INT32)
        plan.kv(Keys.Tokenizer.ADD_PREFIX, T.BOOL, _spm_space_prefix(tok))
    else:
        plan.kv(Keys.Tokenizer.MODEL, T.STRING, "gpt2")
        plan.kv(Keys.Tokenizer.PRE, T.STRING, pre_tokenizer_name(tok, where))
        plan.kv(Keys.Tokenizer.LIST, T.ARRAY, tokens, T.STRING)
        plan.kv(Keys.Tokenizer.TOKEN_TYPE, T.ARRAY, types, T.INT32)
        plan.kv(Keys.Tokenizer.MERGES, T.ARRAY, special.merges, T.STRING)
    ids = dict(special.special_token_ids)
    if "eos" not in ids:  # llama.cpp would silently take id 11
        raise CheckpointError(f"{where}: no eos token; set eos_token in tokenizer_config.json")
    ids.setdefault("bos", ids["eos"])  # likewise for BOS, which a template may still render
    for kind, key in _SPECIAL_ID_KEYS.items():
        if kind in ids:
            plan.kv(key, T.UINT32, int(ids[kind]))
    for kind, key in _ADD_KEYS.items():  # written even when false: llama.cpp's defaults differ by vocab type
        if kind in special.add_special_token or kind != "sep":
            plan.kv(key, T.BOOL, bool(special.add_special_token.get(kind, False)))
    template = ckpt.chat_template or special.chat_template
    if isinstance(template, str):
        plan.kv(Keys.Tokenizer.CHAT_TEMPLATE, T.STRING, template)


def tags_are_single_tokens(ckpt: Checkpoint, tags: list[str]) -> bool:
    """True when every tag string is one added token of the tokenizer (our trained models)."""
    added = {t["content"] for t in ckpt.tokenizer.get("added_tokens", [])}
    return all(t in added for t in tags)
