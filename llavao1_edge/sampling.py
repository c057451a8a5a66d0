"""Token choice from logits, in numpy: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np

_TOP_K_FIRST = 64  # nucleus candidates looked at before falling back to a full sort


def choose(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_p: float) -> tuple[int, float]:
    """(token, its log-probability under the model at temperature 1).

    temperature <= 0 (or no rng) is greedy. The log-probability is the model's own, not the
    sampling distribution's, so the logprob selector compares candidates fairly."""
    m = float(logits.max())
    shifted = logits - m
    lse = float(np.log(np.exp(shifted, dtype=np.float64).sum()))
    if temperature <= 0 or rng is None:
        tok = int(logits.argmax())
        return tok, float(shifted[tok]) - lse
    p = np.exp(shifted.astype(np.float64) / temperature)
    p /= p.sum()
    idx = _nucleus(p, top_p)
    cdf = np.cumsum(p[idx])
    tok = int(idx[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(idx) - 1)])
    return tok, float(shifted[tok]) - lse


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids of the smallest most-probable set with mass >= top_p, most probable first."""
    if top_p >= 1.0:
        return np.argsort(-p, kind="stable")
    k = min(len(p), _TOP_K_FIRST)
    top = np.argpartition(-p, k - 1)[:k] if k < len(p) else np.arange(len(p))
    top = top[np.argsort(-p[top], kind="stable")]
    cum = np.cumsum(p[top])
    if cum[-1] < top_p and k < len(p):  # a flat distribution: sort everything
        top = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[top])
    return top[: int(np.searchsorted(cum, top_p)) + 1]
