import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded tiny Llama and its datasets, built once per test session."""
    from ftctl.adapters.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))
