"""Token choice from logits, in numpy: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def choose(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_p: float) -> tuple[int, float]:
    """(token, its log-probability under the model at temperature 1).

    temperature <= 0 (or no rng) is greedy. The log-probability is the model's own, not the
    sampling distribution's, so the logprob selector compares candidates fairly."""
    logp = log_softmax(logits)
    if temperature <= 0 or rng is None:
        tok = int(np.argmax(logits))
        return tok, float(logp[tok])
    scaled = log_softmax(logits / temperature)
    order = np.argsort(-scaled, kind="stable")
    probs = np.exp(scaled[order])
    keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1) if top_p < 1.0 else len(order)
    kept = probs[:keep] / probs[:keep].sum()
    tok = int(order[rng.choice(keep, p=kept)])
    return tok, float(logp[tok])
