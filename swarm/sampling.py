"""Sampling parameters and the sampler that turns logits into the next token.

Owns `SamplingParams` (validated, frozen: it crosses process boundaries, so it has
plain-JSON round trips) and `Sampler`, which applies llama.cpp's default chain order:
repetition penalty, top-k, top-p, min-p, temperature, then a seeded draw. Greedy
(temperature 0) is a plain argmax. Runs on the host in numpy: the logits of one step
are small next to the weights, and this keeps every knob exact and reproducible.

Imports numpy only (no jax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from swarm.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    min_p: float = 0.05  # 0.0 disables
    repetition_penalty: float = 1.0  # 1.0 disables; llama.cpp's repeat_penalty
    repetition_window: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    top_logprobs: int = 0  # report this many alternatives per generated token
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repetition_window >= 0, "repetition_window must be >= 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.top_logprobs <= 20, "top_logprobs must be between 0 and 20"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"unknown sampling field {sorted(unknown)[0]!r}")
        data = dict(data)
        if "stop" in data:
            data["stop"] = tuple(data["stop"])
        try:
            return cls(**data)
        except TypeError as error:
            raise InvalidRequestError(str(error)) from None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def top_logprobs(logprobs: np.ndarray, count: int) -> list[tuple[int, float]]:
    """The `count` most likely tokens of f64[vocab] log-probabilities, best first."""
    best = np.argpartition(-logprobs, count - 1)[:count]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in best]


class Sampler:
    """Chooses tokens for one sequence; seeded, so a seed reproduces a run."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def _penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        # llama_sampler_penalties: divide positive logits, multiply negative ones.
        params = self.params
        if params.repetition_penalty == 1.0 or not history or params.repetition_window == 0:
            return logits
        recent = np.unique(np.asarray(history[-params.repetition_window :], np.int64))
        recent = recent[(recent >= 0) & (recent < logits.shape[0])]
        logits = logits.copy()
        values = logits[recent]
        logits[recent] = np.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
        return logits

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """logits: f32[vocab] -> token id."""
        params = self.params
        logits = self._penalize(np.asarray(logits, np.float32), history)
        if params.greedy:
            return int(np.argmax(logits))
        candidates = np.arange(logits.shape[0])
        values = logits.astype(np.float64)
        if params.top_k > 0 and params.top_k < values.shape[0]:
            keep = np.argpartition(-values, params.top_k - 1)[: params.top_k]
            candidates, values = candidates[keep], values[keep]
        order = np.argsort(-values, kind="stable")
        candidates, values = candidates[order], values[order]
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        if params.top_p < 1.0:
            cumulative = np.cumsum(probs)
            cut = int(np.searchsorted(cumulative, params.top_p)) + 1
            candidates, values, probs = candidates[:cut], values[:cut], probs[:cut]
        if params.min_p > 0:
            keep = probs >= params.min_p * probs[0]
            candidates, values = candidates[keep], values[keep]
        scaled = (values - values[0]) / params.temperature
        final = np.exp(scaled)
        final /= final.sum()
        return int(candidates[self._rng.choice(len(candidates), p=final)])
