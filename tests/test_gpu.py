"""On a GPU (MLX's CUDA backend on Linux, or Metal on a Mac): telemetry, kill/resume and the memory guard
on the device itself. Marked ``gpu`` and skipped, with the reason, where MLX's default device is the CPU
(CI, this project's build machines); bench/device_check.sh runs them on an NVIDIA machine."""

import json

import pytest

from ftctl.adapters import telemetry as T

_PROBE = T.probe_backend()
ON_GPU = _PROBE.device is not None and _PROBE.device.backend in ("cuda", "metal")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not ON_GPU,
        reason="needs MLX's CUDA or Metal backend; here MLX trains on "
        + (_PROBE.device.label() if _PROBE.device else "nothing")
        + f" ({_PROBE.why})",
    ),
]


def test_telemetry_reads_the_gpu(monkeypatch):
    import mlx.core as mx

    monkeypatch.delenv(T.FAKE_ENV, raising=False)
    t = T.Telemetry()
    assert t.device.backend == _PROBE.device.backend and t.device.memory_bytes > 0
    x = mx.ones((1024, 1024))
    mx.eval(x @ x)
    r = t.read()
    print(f"\n{t.device.label()}: {json.dumps(r)}")
    assert r["mem_active_gb"] > 0.003 and r["rss_gb"] > 0
    assert r["device_mem_total_gb"] and r["device_mem_used_gb"]
    if t.device.backend == "cuda":
        assert t.nvml is not None, "nvidia-ml-py is missing: pip install 'ftctl[cuda]'"
        assert r["device_temp_c"] is not None and 0 < r["device_temp_c"] < 120
        assert r["device_util_pct"] is not None


def test_a_job_killed_on_the_gpu_resumes_to_the_uninterrupted_adapter(tmp_path, demo, baseline):
    """SIGKILL mid-step at global step 23, recover, resume from checkpoint 20: the adapter's sha256 must
    equal the uninterrupted run's on this GPU (the session's baseline trains on it too). When it does not,
    a second uninterrupted run tells a nondeterministic backend (it differs too) from a resume bug."""
    from helpers import crash_env, finished, ftctl, make_workspace

    home = make_workspace(tmp_path / "ws", demo.model_dir)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "job1")
    env = crash_env(tmp_path, "mid_step:23")
    ftctl(home, "start", "--until-idle", "--quiet", env=env, timeout=600, check=False)
    ftctl(home, "start", "--until-idle", "--quiet", timeout=600)
    s = finished(home)
    history = json.loads(ftctl(home, "history", "--json").stdout)
    assert any(e["type"] == "crashed" for e in history), "the kill did not happen"
    print(f"\nGPU resume: {s['adapter_sha256']} vs uninterrupted {baseline.sha1}")
    if s["adapter_sha256"] != baseline.sha1:
        again = make_workspace(tmp_path / "again", demo.model_dir)
        ftctl(again, "submit", str(demo.train), "--valid", str(demo.valid), "--name", "job1")
        ftctl(again, "start", "--until-idle", "--quiet", timeout=600)
        same = finished(again)["adapter_sha256"] == baseline.sha1
        pytest.fail(
            "not bit-exact on this GPU: "
            + (
                "two uninterrupted runs agree, so the resume changed something (a bug)"
                if same
                else "two uninterrupted runs differ too: the backend is not deterministic here"
            )
        )


def test_the_memory_guard_restarts_on_the_gpu_bit_exact(tmp_path, demo, baseline):
    from test_guards import test_memory_growth_restarts_the_worker_before_the_limit_bit_exact

    test_memory_growth_restarts_the_worker_before_the_limit_bit_exact(tmp_path, demo, baseline)
