"""A Llama (or Mistral) decoder as llama.cpp's `llama` text architecture: the text model of LLaVA and
SmolVLM/Idefics3.
"""

from __future__ import annotations

from gguf import MODEL_TENSOR as MT
from gguf import GGUFValueType as T
from gguf import Keys

from llavao1_edge import gguf_keys as K
from llavao1_edge.gguf_keys import tensor_name
from llavao1_edge.stages import STAGES

from .checkpoint import Checkpoint, CheckpointError
from .gguf_plan import PlannedFile, new_plan, permute_qk
from .gguf_vocab import plan_tokenizer, tags_are_single_tokens

# Hugging Face module in each decoder layer -> GGUF tensor
BLOCK_TENSORS: dict[str, MT] = {
    "input_layernorm": MT.ATTN_NORM, "self_attn.q_proj": MT.ATTN_Q, "self_attn.k_proj": MT.ATTN_K,
    "self_attn.v_proj": MT.ATTN_V, "self_attn.o_proj": MT.ATTN_OUT, "post_attention_layernorm": MT.FFN_NORM,
    "mlp.gate_proj": MT.FFN_GATE, "mlp.up_proj": MT.FFN_UP, "mlp.down_proj": MT.FFN_DOWN,
}
ROPE_PERMUTED = (MT.ATTN_Q, MT.ATTN_K)  # rows reordered per head for ggml's RoPE layout


def stage_keys(plan: PlannedFile, ckpt: Checkpoint) -> None:
    """Our metadata: the model speaks the four-stage format (its tags are single tokens)."""
    if tags_are_single_tokens(ckpt, [t for s in STAGES for t in (s.open_tag, s.close_tag)]):
        plan.kv(K.STAGE_FORMAT, T.STRING, K.STAGE_FORMAT_VALUE)
        plan.kv(K.STAGE_TAGS, T.ARRAY, [s.tag for s in STAGES], T.STRING)


def vocab_and_ends(plan: PlannedFile, ckpt: Checkpoint, text_config: dict, emb, norm, lm_head: str) -> None:
    """What every text model ends its plan with: RMS-norm epsilon, the vocabulary and tokenizer, our stage
    keys, the token embeddings, the final norm and the output layer (unless tied to the embeddings)."""
    tc, t = text_config, ckpt.tensors
    plan.kv(Keys.Attention.LAYERNORM_RMS_EPS, T.FLOAT32, float(tc.get("rms_norm_eps", 1e-6)))
    plan.kv(Keys.LLM.VOCAB_SIZE, T.UINT32, emb.shape[0])
    plan_tokenizer(plan, ckpt, emb.shape[0])
    stage_keys(plan, ckpt)
    plan.tensor(tensor_name(MT.TOKEN_EMBD), emb)
    plan.tensor(tensor_name(MT.OUTPUT_NORM), norm)
    tied = ckpt.config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    if not tied and lm_head in t:
        plan.tensor(tensor_name(MT.OUTPUT), t[lm_head])


def plan_llama_text(ckpt: Checkpoint, outtype: str, text_config: dict, prefix: str, lm_head: str) -> PlannedFile:
    """The text GGUF of a Llama decoder whose weights are named `prefix` + embed_tokens / layers.N / norm."""
    tc, t = text_config, ckpt.tensors
    plan = new_plan("llama", outtype, ckpt.name, ckpt.sha256)
    n_head = tc["num_attention_heads"]
    n_kv = tc.get("num_key_value_heads") or n_head
    width = tc["hidden_size"]
    head_dim = tc.get("head_dim") or width // n_head
    rope = tc.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise CheckpointError(f"{ckpt.path / 'config.json'}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    n_layers = tc["num_hidden_layers"]
    emb = t[prefix + "embed_tokens.weight"]
    plan.kv(Keys.LLM.CONTEXT_LENGTH, T.UINT32, int(tc.get("max_position_embeddings", 2048)))
    plan.kv(Keys.LLM.EMBEDDING_LENGTH, T.UINT32, width)
    plan.kv(Keys.LLM.BLOCK_COUNT, T.UINT32, n_layers)
    plan.kv(Keys.LLM.FEED_FORWARD_LENGTH, T.UINT32, tc["intermediate_size"])
    plan.kv(Keys.Attention.HEAD_COUNT, T.UINT32, n_head)
    plan.kv(Keys.Attention.HEAD_COUNT_KV, T.UINT32, n_kv)
    plan.kv(Keys.Rope.FREQ_BASE, T.FLOAT32, float(rope_theta))
    plan.kv(Keys.Rope.DIMENSION_COUNT, T.UINT32, head_dim)
    vocab_and_ends(plan, ckpt, tc, emb, t[prefix + "norm.weight"], lm_head)
    heads = {MT.ATTN_Q: n_head, MT.ATTN_K: n_kv}
    for i in range(n_layers):
        for hf, kind in BLOCK_TENSORS.items():
            w = t[f"{prefix}layers.{i}.{hf}.weight"]
            plan.tensor(tensor_name(kind, i), permute_qk(w, heads[kind]) if kind in ROPE_PERMUTED else w)
    return plan
