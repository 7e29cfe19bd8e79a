import pytest

from tests.e2e.server import LauncherProcess


@pytest.fixture(scope="session")
def server(bundled_model_dir):
    """One launcher serving the bundled model on CPU for the whole session."""
    with LauncherProcess(bundled_model_dir) as launcher:
        yield launcher
