"""Token choice from logits, in numpy: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import bisect

import numpy as np

_TOP_K_FIRST = 64  # nucleus candidates looked at before falling back to a full sort


class TokenDistribution:
    """The next-token distribution at one position, prepared once and drawn from by every candidate
    that shares the position (candidates that sampled the same tokens so far share one row of logits).

    Preparation (the log-normaliser, the nucleus and its cumulative mass) is the costly part and
    each candidate's draw is one random number, so N candidates in one row cost about one choice."""

    def __init__(self, logits: np.ndarray, temperature: float, top_p: float):
        self.logits, self.temperature, self.top_p = logits, temperature, top_p
        m = float(logits.max())
        self._shifted = logits - m
        self._lse = float(np.log(np.exp(self._shifted, dtype=np.float64).sum()))
        self._greedy: int | None = None
        self._nucleus: tuple[np.ndarray, np.ndarray] | None = None  # (token ids, cumulative mass)

    def logprob(self, tok: int) -> float:
        """The model's own log-probability (temperature 1), so the logprob selector compares fairly."""
        return float(self._shifted[tok]) - self._lse

    def choose(self, rng: np.random.Generator | None) -> tuple[int, float]:
        """(token, its log-probability); greedy when the temperature is <= 0 or there is no rng."""
        if self.temperature <= 0 or rng is None:
            if self._greedy is None:
                self._greedy = int(self.logits.argmax())
            return self._greedy, self.logprob(self._greedy)
        if self._nucleus is None:
            p = np.exp(self._shifted.astype(np.float64) / self.temperature)
            p /= p.sum()
            top = int(self.logits.argmax())
            if p[top] >= self.top_p and self.top_p < 1.0:  # a confident position: a one-token nucleus, no sort
                self._nucleus = [top], [float(p[top])]
            else:
                idx, cdf = _nucleus(p, self.top_p)
                self._nucleus = idx.tolist(), cdf.tolist()  # Python lists: each draw is then one bisect
        idx, cdf = self._nucleus
        tok = idx[min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), len(idx) - 1)]
        return tok, self.logprob(tok)


def choose(logits: np.ndarray, rng: np.random.Generator | None, temperature: float, top_p: float) -> tuple[int, float]:
    """(token, its log-probability under the model at temperature 1) for one draw from `logits`.

    temperature <= 0 (or no rng) is greedy. The log-probability is the model's own, not the
    sampling distribution's, so the logprob selector compares candidates fairly."""
    return TokenDistribution(logits, temperature, top_p).choose(rng)


def _nucleus(p: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the smallest most-probable set with mass >= top_p, most probable first, and
    their cumulative mass."""
    if top_p >= 1.0:
        top = np.argsort(-p, kind="stable")
        return top, np.cumsum(p[top])
    neg = -p
    k = min(len(p), _TOP_K_FIRST)
    top = np.argpartition(neg, k - 1)[:k] if k < len(p) else np.arange(len(p))
    top = top[np.argsort(neg[top], kind="stable")]
    cum = np.cumsum(p[top])
    if cum[-1] < top_p and k < len(p):  # a flat distribution: sort everything
        top = np.argsort(neg, kind="stable")
        cum = np.cumsum(p[top])
    n = int(np.searchsorted(cum, top_p)) + 1
    return top[:n], cum[:n]  # a prefix of a cumulative sum is the cumulative sum of the prefix
