"""How long a step takes, learned from the steps the shards ran: the basis for sizing prompt
chunks so that the requests already decoding keep streaming while a long prompt is computed.

Model: seconds = fixed + per_token * tokens + per_attention * attention, where `tokens` counts
every token the step computes and `attention` is the work of attending over the cache: a request
computing q tokens after c cached ones contributes q * (c + (q + 1) / 2) (a decode: c + 1). The
three coefficients are a least-squares fit over recent steps (exponentially forgotten, ridge-
regularized), refreshed as results arrive. Pure Python, no I/O, like the scheduler that asks it.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StepWork:
    """What a step computes, in the model's terms."""

    tokens: float = 0.0
    attention: float = 0.0

    def __add__(self, other: "StepWork") -> "StepWork":
        return StepWork(self.tokens + other.tokens, self.attention + other.attention)

    @staticmethod
    def of(num_cached: int, num_tokens: int) -> "StepWork":
        """A request computing `num_tokens` tokens after `num_cached` ones already in the cache."""
        return StepWork.total([(num_cached, num_tokens)])

    @staticmethod
    def total(requests) -> "StepWork":
        """The work of several requests, given as (num_cached, num_tokens) pairs."""
        tokens = attention = 0.0
        for num_cached, num_tokens in requests:
            tokens += num_tokens
            attention += num_tokens * (num_cached + (num_tokens + 1) / 2)
        return StepWork(tokens, attention)


class StepCostModel:
    def __init__(self, forget: float = 0.99, min_steps: int = 16):
        self.forget = forget  # weight kept by each past step per new one (~100 steps of memory)
        self.min_steps = min_steps  # observations before the model is trusted
        self.num_steps = 0
        self._xx = [[0.0] * 3 for _ in range(3)]  # decayed sums of x x^T and x y, x = (1, tokens, attention)
        self._xy = [0.0] * 3
        self._coef: list[float] | None = None

    @property
    def ready(self) -> bool:
        return self._coef is not None

    def observe(self, work: StepWork, seconds: float) -> None:
        """Record a step's work and its measured forward time."""
        x = (1.0, work.tokens, work.attention)
        for i in range(3):
            self._xy[i] = self.forget * self._xy[i] + x[i] * seconds
            for j in range(3):
                self._xx[i][j] = self.forget * self._xx[i][j] + x[i] * x[j]
        self.num_steps += 1
        if self.num_steps >= self.min_steps:
            self._coef = self._solve()

    def predict(self, work: StepWork) -> float:
        """Seconds a step doing `work` is expected to take (requires `ready`)."""
        fixed, per_token, per_attention = self._coef
        return fixed + per_token * work.tokens + per_attention * work.attention

    def max_chunk(self, num_cached: int, seconds: float) -> int:
        """The most tokens a request with `num_cached` cached tokens can add to a step without
        adding more than `seconds` to it (requires `ready`)."""
        _, per_token, per_attention = self._coef
        # per_token * n + per_attention * n * (num_cached + (n + 1) / 2) <= seconds, solved for n
        a = per_attention / 2
        b = per_token + per_attention * (num_cached + 0.5)
        if a <= 0:
            return int(seconds / b) if b > 0 else 1 << 30
        return max(0, int((-b + (b * b + 4 * a * seconds) ** 0.5) / (2 * a)))

    def _solve(self) -> list[float]:
        """Ridge least squares: (X^T X + r I) w = X^T y, by Gaussian elimination. The ridge is
        relative to each feature's scale, so it only steadies directions the data leaves open."""
        m = [row[:] + [self._xy[i]] for i, row in enumerate(self._xx)]
        for i in range(3):
            m[i][i] += 1e-6 * (self._xx[i][i] + 1e-12)
        for col in range(3):
            pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
            m[col], m[pivot] = m[pivot], m[col]
            for r in range(3):
                if r != col and m[col][col]:
                    f = m[r][col] / m[col][col]
                    m[r] = [a - f * b for a, b in zip(m[r], m[col])]
        coef = [m[i][3] / m[i][i] if m[i][i] else 0.0 for i in range(3)]
        return [max(c, 0.0) for c in coef]  # no step gets cheaper by doing more
