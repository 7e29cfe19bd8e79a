import pytest

from tests.e2e.server import LauncherProcess


@pytest.fixture(scope="session")
def server(bundled_model_dir):
    """One launcher serving the bundled model on CPU for the whole session, in float32 (the
    parity tests compare it with transformers in float32). Apart from the dtype it starts as
    `make run` does: compiled, with the default limits and KV cache."""
    with LauncherProcess(bundled_model_dir, "--dtype", "float32", as_users_start_it=True) as launcher:
        yield launcher
