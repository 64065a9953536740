"""Sampling parameters and the sampler that turns logits into the next token.

Owns `SamplingParams` (validated, frozen: it crosses process boundaries, so it has
plain-JSON round trips) and `Sampler`, which applies llama.cpp's default chain order:
repetition penalty, top-k, top-p, min-p, temperature, then a seeded draw. Greedy
(temperature 0) is a plain argmax. Runs on the host in numpy: the logits of one step
are small next to the weights, and this keeps every knob exact and reproducible. No
filter selects or sorts the whole vocabulary per token (see `largest`): with Gemma's
262,144 tokens that cost more than the decode step.

Imports numpy only (no jax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from swarm.errors import InvalidRequestError


class ScoredRows(np.ndarray):
    """Logits that carry each row's greedy token (`best`: i32 per row, or an int for one
    row), found where they were made (`kernels.cpu.argmax`, while the vocabulary head's
    output is still in the cores' caches): a greedy draw then reads no logits.

    A plain ndarray otherwise. Indexing rows (an int, a slice, an index array) indexes
    `best` alike; other views carry no `best`.
    """

    best: np.ndarray | int | None

    @classmethod
    def of(cls, logits: np.ndarray, best: np.ndarray | int) -> ScoredRows:
        rows = np.asarray(logits).view(cls)
        rows.best = best
        return rows

    def __array_finalize__(self, obj: Any) -> None:
        self.best = None  # a view keeps `best` only through __getitem__ on rows

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        best = self.best
        if not isinstance(item, ScoredRows) or not isinstance(best, np.ndarray) or self.ndim != 2:
            return item
        if isinstance(index, (int, np.integer, slice)) or (
            isinstance(index, np.ndarray) and index.ndim == 1 and index.dtype.kind in "iu"
        ):
            item.best = best[index]
            if item.ndim == 1:
                item.best = int(item.best)
        return item


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


# A draw over a large vocabulary (Gemma's is 262,144) must not select or sort the whole
# of it per token: that costs more than a decode step. The sampler finds the few largest
# logits from a strided sample's cut instead, exactly (see `largest`).
_SAMPLE_STRIDE_FOR = 4096  # vocabularies above this size are sampled to find the cut
_SAMPLE_RANK_MARGIN = 16  # the cut sits this many sample places below the wanted rank


def largest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest of f32|f64[n] values, largest first, equal values
    by index: a stable sort of -values, cut to `count`.

    A few of a large vocabulary come from groups' maxima (`_largest_by_groups`).
    Otherwise one pass over the values compares them with a cut taken from a strided
    sample, low enough that usually somewhat more than `count` values pass it; only
    those are sorted. When too few pass (NaNs, or a sample that missed the top) or far too many
    (a flat run of equal values), a selection over all of them finds the cut instead.
    """
    n = values.shape[0]
    count = min(count, n)
    if count <= 0:
        return np.zeros(0, np.int64)
    if count <= _GROUPED_COUNT and n >= _GROUPED_MIN:
        found = _largest_by_groups(values, count)
        if found is not None:
            return found
    candidates = None
    if n > _SAMPLE_STRIDE_FOR:
        sample = values[:: n // _SAMPLE_STRIDE_FOR]
        rank = min(sample.shape[0] - 1, count * sample.shape[0] // n + _SAMPLE_RANK_MARGIN)
        cut = np.partition(sample, sample.shape[0] - 1 - rank)[sample.shape[0] - 1 - rank]
        passed = np.flatnonzero(values >= cut)
        if count <= passed.shape[0] <= 4 * count + n // 16:
            candidates = passed
    if candidates is None:
        kth = -np.partition(-values, count - 1)[count - 1]  # the count-th largest (NaNs last)
        candidates = np.arange(n) if np.isnan(kth) else np.flatnonzero(values >= kth)
    order = np.argsort(-values[candidates], kind="stable")[:count]
    return candidates[order]


# A few largest of a large vocabulary (the default top-k, logprobs) come from its groups'
# maxima: one pass that reads the logits (fresh from the device, so from memory) once.
_GROUPED_COUNT = 64
_GROUPED_MIN = 16_384
_GROUP_ROWS = 64


def _largest_by_groups(values: np.ndarray, count: int) -> np.ndarray | None:
    """`largest` from groups' maxima, or None where another way suits better.

    The values are cut into groups (group j: positions j, j + c, j + 2c, ..., c =
    n // _GROUP_ROWS; the last n % _GROUP_ROWS values stay apart). The count-th largest
    group maximum t is at most the count-th largest value, so every value of the cut is
    at least t, and lies in a group whose maximum is at least t: only those groups, and
    the values apart, are compared with t, and the few that pass sorted. NaNs never
    pass (a group's maximum ignores them), as they rank last in the sort.
    """
    n = values.shape[0]
    columns = n // _GROUP_ROWS
    if count > columns:
        return None
    head = values[: _GROUP_ROWS * columns].reshape(_GROUP_ROWS, columns)
    maxima = np.fmax.reduce(head, axis=0)
    if np.isnan(maxima).any():
        return None  # a group of NaNs alone, which the selection would rank first
    cut = np.partition(maxima, columns - count)[columns - count]
    groups = np.flatnonzero(maxima >= cut)
    if groups.shape[0] > 4 * count:
        return None  # a flat run of equal values: a selection over all suits better
    rows, at = np.nonzero(head[:, groups] >= cut)
    candidates = rows * columns + groups[at]
    if _GROUP_ROWS * columns < n:
        rest = np.flatnonzero(values[_GROUP_ROWS * columns :] >= cut) + _GROUP_ROWS * columns
        candidates = np.concatenate([candidates, rest])
    candidates.sort()  # by index, so that the stable sort below ties by index
    return candidates[np.argsort(-values[candidates], kind="stable")[:count]]


def token_logprobs(logits: np.ndarray, token: int, count: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under f32[vocab] logits, and the `count` most
    likely tokens with theirs (what `log_softmax` and `top_logprobs` give, without
    building and searching the whole array of log-probabilities)."""
    top = np.max(logits)
    # f32 exponentials (numpy vectorizes them; f64 ones cost ten times as much over a
    # large vocabulary), summed in f64.
    normalizer = float(top) + float(np.log(np.sum(np.exp(logits - top), dtype=np.float64)))
    alternatives = [(int(i), float(np.float64(logits[i]) - normalizer)) for i in largest(logits, count)]
    return float(np.float64(logits[token]) - normalizer), alternatives


class Sampler:
    """Chooses tokens for one sequence; seeded, so a seed reproduces a run."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def _penalizes(self, history: Sequence[int]) -> bool:
        params = self.params
        return params.repetition_penalty != 1.0 and bool(history) and params.repetition_window != 0

    def _penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        # llama_sampler_penalties: divide positive logits, multiply negative ones.
        params = self.params
        if not self._penalizes(history):
            return logits
        recent = np.unique(np.asarray(history[-params.repetition_window :], np.int64))
        recent = recent[(recent >= 0) & (recent < logits.shape[0])]
        logits = logits.copy()
        values = logits[recent]
        logits[recent] = np.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
        return logits

    def sample(
        self, logits: np.ndarray, history: Sequence[int] = (), allowed: np.ndarray | None = None
    ) -> int:
        """logits: f32[vocab] -> token id. With `allowed` (token ids), only those can be
        drawn: the chain runs over their logits alone, as it would over logits with every
        other token at -inf."""
        params = self.params
        best = getattr(logits, "best", None)
        if params.greedy and allowed is None and isinstance(best, int) and not self._penalizes(history):
            return best  # found where the logits were made: the same first index of the largest
        logits = self._penalize(np.asarray(logits, np.float32), history)
        if allowed is not None:
            # In token order, so that equal logits (the penalty can make them) go by
            # token id, as they would in the whole vocabulary.
            allowed = np.sort(np.asarray(allowed, np.int64))
            logits = logits[allowed]
        if params.greedy:
            chosen = int(np.argmax(logits))
        else:
            candidates, probs = self._distribution(logits)
            chosen = int(candidates[self._rng.choice(len(candidates), p=probs)])
        return chosen if allowed is None else int(allowed[chosen])

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """What a sampled draw chooses from: the tokens the chain keeps and their
        f64 probabilities (temperature > 0)."""
        return self._distribution(self._penalize(np.asarray(logits, np.float32), history))

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        candidates, values, top = self._candidates(logits)
        if self.params.min_p > 0:
            keep = np.exp(values - top) >= self.params.min_p
            candidates, values = candidates[keep], values[keep]
        probs = np.exp((values - top) / self.params.temperature)
        return candidates, probs / probs.sum()

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float64]:
        """The tokens that top-k and top-p keep, their logits in f64 (best first where
        top-p needs the order), and the best logit (always among them)."""
        params = self.params
        vocab = logits.shape[0]
        if 0 < params.top_k < vocab:
            # The best logit is the first of the top k: no pass over the logits (fresh
            # from the device, so read from memory) to find it. NaNs rank last there.
            candidates = largest(logits, params.top_k)
            top = np.float64(logits[candidates[0]])
        else:
            top = np.float64(np.max(logits))
            if params.top_p < 1.0:
                return (*self._nucleus(logits, top), top)
            if params.min_p > 0:
                # min-p alone drops every token below min_p times the best one's
                # probability: only those at or above that logit can stay.
                candidates = np.flatnonzero(logits >= top + np.log(params.min_p) - 1e-6)
            else:
                candidates = np.arange(vocab)
        values = logits[candidates].astype(np.float64)
        if params.top_p < 1.0:
            probs = np.exp(values - top)
            cut = int(np.searchsorted(np.cumsum(probs / probs.sum()), params.top_p)) + 1
            candidates, values = candidates[:cut], values[:cut]
        return candidates, values, top

    def _nucleus(self, logits: np.ndarray, top: np.float64) -> tuple[np.ndarray, np.ndarray]:
        """top-p over the whole vocabulary: the shortest best-first run of tokens whose
        probability reaches p. Only tokens above a cut are sorted: the cut comes from a
        strided sample's probability mass, and is lowered until the tokens above it
        hold p of the whole."""
        values = logits.astype(np.float64)
        probs = np.exp(logits - np.float32(top))  # f32, as `token_logprobs` takes them
        total = probs.sum(dtype=np.float64)
        need = self.params.top_p * total
        stride = max(1, logits.shape[0] // _SAMPLE_STRIDE_FOR)
        sample = -np.sort(-probs[::stride])
        rank = int(np.searchsorted(np.cumsum(sample, dtype=np.float64) * stride, need))
        if rank >= sample.shape[0]:
            rank = 0  # the sample missed a dominant token: widen from the top instead
        while True:
            rank = 2 * rank + _SAMPLE_RANK_MARGIN
            if stride == 1 or rank >= sample.shape[0]:
                candidates = np.arange(logits.shape[0])
            else:
                # Probabilities that underflowed to zero hold no mass: never a reason to sort them.
                floor = max(sample[rank], np.finfo(np.float32).tiny)
                candidates = np.flatnonzero(probs >= floor)
                if probs[candidates].sum(dtype=np.float64) < need:
                    continue
            order = np.argsort(-values[candidates], kind="stable")
            candidates = candidates[order]
            cumulative = np.cumsum(probs[candidates], dtype=np.float64) / total
            cut = int(np.searchsorted(cumulative, self.params.top_p)) + 1
            return candidates[:cut], values[candidates[:cut]]
