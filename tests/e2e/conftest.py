import pytest


@pytest.fixture(autouse=True)
def _isolated(isolated_env):
    """Every path these tests write is under tmp_path; no settings leak in from the shell."""
    return isolated_env
