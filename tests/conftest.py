import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import ORPO, RUNS  # noqa: E402

# The suite compares the bits of separate jobs (an uninterrupted reference and a killed one), and a
# job's OpenBLAS thread count — measured at its first load by default (core/threads.py), with the load
# of the moment — changes them: every job here trains on one thread unless a test says otherwise
# (tests/test_daemon.py's measured-threads tests clear it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded tiny Llama and its datasets, built once per test session."""
    from ftctl.adapters.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))


class Baseline(NamedTuple):
    home: Path  # the workspace, for tests that inspect an uninterrupted run
    sha1: str  # adapter sha256 of job 0001: 40 steps of TEST_CONFIG from a fresh adapter
    sha2: str  # of job 0002: the same 40 steps, warm-started from job 0001


def _uninterrupted(home: Path, demo, jobs: int, **cfg) -> list[dict]:
    """Uninterrupted 40-step jobs of TEST_CONFIG (and ``cfg``) in one lineage: their status."""
    from helpers import finished, ftctl, make_workspace, training_data

    make_workspace(home, demo.model_dir, **cfg)
    train, valid = training_data(demo, cfg)
    for i in range(jobs):
        name = f"job{i + 1}"
        ftctl(home, "submit", str(train), "--valid", str(valid), "--name", name, "--again")
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)
    return [finished(home, f"{i + 1:04d}") for i in range(jobs)]


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, demo) -> Baseline:
    """Two uninterrupted 40-step jobs of TEST_CONFIG in one workspace, trained once per session:
    every interrupted run must end with the same adapter bytes."""
    home = tmp_path_factory.mktemp("baseline") / "ws"
    first, second = _uninterrupted(home, demo, 2)
    # the lineage's cumulative step
    assert first["global_step"] == 40 and second["global_step"] == 80
    return Baseline(home, first["adapter_sha256"], second["adapter_sha256"])


@pytest.fixture(scope="session")
def full_baseline(tmp_path_factory, demo) -> Baseline:
    """One uninterrupted 40-step full fine-tune of TEST_CONFIG (sha2: None)."""
    home = tmp_path_factory.mktemp("full-baseline") / "ws"
    (first,) = _uninterrupted(home, demo, 1, fine_tune_type="full")
    return Baseline(home, first["adapter_sha256"], None)


@pytest.fixture(scope="session")
def dpo_baseline(tmp_path_factory, demo) -> Baseline:
    """One uninterrupted 40-step DPO job of TEST_CONFIG on the demo's preference pairs (sha2: None)."""
    home = tmp_path_factory.mktemp("dpo-baseline") / "ws"
    (first,) = _uninterrupted(home, demo, 1, **RUNS["dpo"])
    return Baseline(home, first["adapter_sha256"], None)


@pytest.fixture(scope="session")
def orpo_baseline(tmp_path_factory, demo) -> Baseline:
    """One uninterrupted 40-step ORPO job of TEST_CONFIG on the demo's preference pairs (sha2: None)."""
    home = tmp_path_factory.mktemp("orpo-baseline") / "ws"
    (first,) = _uninterrupted(home, demo, 1, **ORPO)
    return Baseline(home, first["adapter_sha256"], None)


BASELINES = {"lora": "baseline", "full": "full_baseline", "dpo": "dpo_baseline"}


@pytest.fixture
def uninterrupted(request) -> Baseline:
    """The uninterrupted run of the test's ``run`` (helpers.RUNS: lora, full, dpo; or orpo) or
    ``fine_tune_type`` (lora, full): a test parametrised over one of them."""
    name = "run" if "run" in request.fixturenames else "fine_tune_type"
    which = request.getfixturevalue(name)
    return request.getfixturevalue(BASELINES.get(which, f"{which}_baseline"))


@pytest.fixture
def ws(tmp_path, capsys, demo):
    """A workspace made by `ftctl init` on the demo model (for commands that train nothing)."""
    from helpers import run

    home = tmp_path / "home"
    assert run(capsys, "init", "--model", demo.model_dir, "--home", home)[0] == 0
    return home
