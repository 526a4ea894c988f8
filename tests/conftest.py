import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (multi-process training runs)")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo corpus (Python's own docs and sources) tokenized once per test session."""
    from internlm.data import prepare_demo_data

    return prepare_demo_data(str(tmp_path_factory.mktemp("demo_cache")), vocab_size=2048)
