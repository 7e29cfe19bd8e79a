import pytest

import configflags
from launcher.config import LaunchConfig
from router.config import RouterConfig
from shard.config import ShardConfig


@pytest.fixture(autouse=True)
def no_flag_variables(monkeypatch):
    """Unset every variable the launcher or a child would read as a flag (HOSTNAME, PORT... may be set)."""
    for cls in (LaunchConfig, RouterConfig, ShardConfig):
        for flag in configflags.flags(cls):
            monkeypatch.delenv(flag.env(every=True), raising=False)
