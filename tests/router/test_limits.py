"""TGI's defaults and startup checks for the token limits."""

import pytest

from router.config import RouterConfig
from router.limits import Limits, check_pool, resolve_limits


def config(**kw) -> RouterConfig:
    return RouterConfig(model_dir="m", shard_addresses=("unix:///s",), **kw)


def test_defaults_follow_the_model():
    assert resolve_limits(config(), 8192) == Limits(4095, 4096, 4145)
    assert resolve_limits(config(), 2048) == Limits(2047, 2048, 2097)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_total_tokens": 9000}, r"--max-total-tokens \(9000\) exceeds the model's 8192 positions"),
        (
            {"max_input_tokens": 100, "max_total_tokens": 100},
            r"--max-input-tokens \(100\) must be < --max-total-tokens",
        ),
    ],
)
def test_conflicting_limits_name_the_flags(kw, message):
    with pytest.raises(ValueError, match=message):
        resolve_limits(config(**kw) if "max_input_tokens" not in kw else _unchecked(**kw), 8192)


def _unchecked(**kw) -> RouterConfig:
    """RouterConfig checks input < total itself; build one past that check to test resolve_limits."""
    c = config()
    for k, v in kw.items():
        object.__setattr__(c, k, v)
    return c


def test_the_pool_must_hold_max_total_and_the_prefill_budget():
    with pytest.raises(ValueError, match="fewer than --max-total-tokens"):
        check_pool(Limits(99, 100, 64), 80)
    with pytest.raises(ValueError, match="--max-batch-prefill-tokens \\(200\\) must be <="):
        check_pool(Limits(99, 100, 200), 160)
    check_pool(Limits(99, 100, 64), 100)


def test_router_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--max-input-tokens"):
        config(max_input_tokens=10, max_total_tokens=10)
    with pytest.raises(ValueError, match="--waiting-served-ratio"):
        config(waiting_served_ratio=-1)
