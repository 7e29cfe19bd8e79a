"""The step cost model recovers a step-time law from observations and sizes chunks by it."""

import random

import pytest

from router.core.step_cost import StepCostModel, StepWork


def test_fit_recovers_the_coefficients_of_noisy_steps():
    rng = random.Random(0)
    model = StepCostModel()
    assert not model.ready
    for _ in range(400):
        decodes, chunk, context = rng.randint(1, 32), rng.choice([0, 0, 64, 256]), rng.randint(50, 2000)
        work = StepWork(decodes, decodes * context) + StepWork.of(context, chunk)
        model.observe(work, (0.012 + 0.0004 * work.tokens + 7e-7 * work.attention) * rng.uniform(0.95, 1.05))
    assert model.ready
    probe = StepWork(32, 32 * 300) + StepWork.of(1500, 128)
    assert model.predict(probe) == pytest.approx(0.012 + 0.0004 * probe.tokens + 7e-7 * probe.attention, rel=0.05)


def test_max_chunk_is_the_largest_chunk_within_the_time():
    model = StepCostModel(min_steps=1)
    for tokens, attention in [(1, 0), (100, 0), (10, 5000), (50, 90000)]:
        model.observe(StepWork(tokens, attention), 0.01 + 0.001 * tokens + 1e-6 * attention)
    for cached, seconds in [(0, 0.05), (2000, 0.05), (500, 0.2)]:
        n = model.max_chunk(cached, seconds)
        cost = model.predict(StepWork.of(cached, n)) - model.predict(StepWork())
        bigger = model.predict(StepWork.of(cached, n + 1)) - model.predict(StepWork())
        assert cost <= seconds + 1e-9 < bigger
