"""Child process for `verify`: runs prompts through llama.cpp and saves logits and embeddings.

Run as `python -m llavao1_export.llama_probe REQUEST.json OUT.npz`. It is a separate process so
that a native abort inside llama.cpp can never take the caller down with it.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def probe(req: dict) -> dict[str, np.ndarray]:
    from llavao1_edge.engine import Engine, EngineConfig

    cfg = EngineConfig(n_ctx=req.get("n_ctx", 2048), n_seq_max=2, kv_f32=True, flash_attn=False,
                       n_threads=req.get("threads", 0))
    out: dict[str, np.ndarray] = {}
    with Engine(req["model"], req.get("mmproj"), cfg) as e:
        ids = e.tokenize(req["text_prompt"], add_bos=e.add_bos)  # as the runtime tokenizes a prompt
        logits = e.score(0, ids + req["text_continuation"], 0)
        out["text_ids"] = np.array(ids)
        out["eos_is_eog"] = np.array(req.get("eos") is not None and e.is_eog(req["eos"]))
        out["text_logits"] = logits[: len(ids)]
        out["text_argmax"] = logits[len(ids) - 1:].argmax(-1)  # greedy choice at each continuation step
        if req.get("mmproj"):
            if e.marker not in req["image_prompt"]:
                raise SystemExit(f"the image prompt lacks llama.cpp's marker {e.marker}")
            prompt = e.prepare(req["image_prompt"], req["image"])
            state, _ = e.eval_prompt(prompt)
            chunks = e.image_embeddings(prompt)  # one per image chunk (tiles and overview for slicing projectors)
            out["image_embd"] = np.concatenate(chunks)
            out["image_chunk_tokens"] = np.array([len(c) for c in chunks])
            out["image_ids"] = np.array([t for c in prompt.chunks if hasattr(c, "tokens") for t in c.tokens])
            cont = e.score(0, req["image_continuation"], state.pos) if req["image_continuation"] else np.empty((0,))
            out["image_last_logits"] = state.logits
            out["image_argmax"] = np.concatenate([[state.logits.argmax()], cont.argmax(-1)[:-1] if len(cont) else []])
            e.free_prompt(prompt)
    return out


def main() -> int:
    req = json.loads(open(sys.argv[1], encoding="utf-8").read())
    np.savez(sys.argv[2], **probe(req))
    return 0


if __name__ == "__main__":
    sys.exit(main())
