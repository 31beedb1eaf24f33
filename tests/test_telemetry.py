"""Device telemetry (adapters/telemetry.py): the device and its readings, NVML through a fake at the
seam, the journal's new metrics columns, how status and doctor show them."""

import sqlite3

import pytest

from ftctl.adapters import telemetry as T
from ftctl.cli.render import device_line
from ftctl.events.journal import Journal
from ftctl.events.types import Metrics


class FakeNV:
    """nvidia-ml-py's module, as the NVML class uses it: the readings of one RTX 4090."""

    NVML_TEMPERATURE_GPU = 0

    class Mem:
        used, total = 20_000_000_000, 24_000_000_000

    class Util:
        gpu = 97

    def __init__(self, fail=()):
        self.fail = set(fail)

    def _maybe(self, name, value):
        if name in self.fail:
            raise RuntimeError(f"NVMLError_NotSupported: {name}")
        return value

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._maybe("memory", self.Mem)

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._maybe("util", self.Util)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._maybe("temp", 71)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._maybe("power", 312_500)  # milliwatts

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA GeForce RTX 4090"


CUDA = T.Device(
    backend="cuda", index=0, name="NVIDIA GeForce RTX 4090", memory_bytes=24_000_000_000
)


def test_nvml_readings_and_mlx_memory_on_cuda(monkeypatch):
    monkeypatch.delenv(T.FAKE_ENV, raising=False)
    t = T.Telemetry(CUDA, nvml=T.NVML(FakeNV(), None))
    r = t.read()
    assert set(r) == set(T.READINGS)
    assert r["device_mem_used_gb"] == 20.0 and r["device_mem_total_gb"] == 24.0
    assert r["device_util_pct"] == 97 and r["device_temp_c"] == 71 and r["device_power_w"] == 312.5
    assert r["mem_active_gb"] is not None and r["rss_gb"] > 0  # MLX's and the process's own
    assert CUDA.label() == "cuda:0 NVIDIA GeForce RTX 4090"


def test_a_reading_the_gpu_does_not_give_is_none_and_the_rest_still_come(monkeypatch):
    monkeypatch.delenv(T.FAKE_ENV, raising=False)
    r = T.Telemetry(CUDA, nvml=T.NVML(FakeNV(fail={"power", "memory"}), None)).read()
    assert r["device_power_w"] is None and r["device_mem_used_gb"] is None
    assert r["device_temp_c"] == 71


def test_cpu_reports_no_gpu_readings(monkeypatch):
    monkeypatch.delenv(T.FAKE_ENV, raising=False)
    t = T.Telemetry()
    assert t.device.backend in ("cpu", "metal", "cuda")
    r = t.read()
    if t.device.backend == "cpu":
        assert r["device_temp_c"] is None and r["device_mem_used_gb"] is None
        assert t.device.label().startswith("cpu")
    assert r["rss_gb"] > 0.01 and r["swap_gb"] is not None


def test_the_seam_fakes_readings_and_grows_them_per_step(monkeypatch):
    monkeypatch.setenv(
        T.FAKE_ENV,
        '{"backend": "cuda", "device": "NVIDIA H100", "rss_gb": 1.0, "rss_gb_per_step": 0.25,'
        ' "device_temp_c": 90, "mem_active_gb": 2, "mem_cache_gb": 0.5}',
    )
    t = T.Telemetry(nvml=None)
    assert t.device.label() == "cuda:0 NVIDIA H100"
    assert t.read(0)["rss_gb"] == 1.0 and t.read(4)["rss_gb"] == 2.0
    assert t.read(4)["device_temp_c"] == 90.0
    monkeypatch.setenv(T.FAKE_ENV, '{"rss_gigs": 1}')
    with pytest.raises(ValueError, match="unknown reading 'rss_gigs'"):
        T.fake()


def test_backend_reasons():
    cpu = T.Device(backend="cpu", name="AMD EPYC")
    assert "ftctl[cuda]" in T.backend_reason(cpu, ["mlx-cpu 0.32.4"], True, "linux")
    assert "check the driver" in T.backend_reason(cpu, ["mlx-cuda-12 0.32.4"], True, "linux")
    assert "no NVIDIA GPU" in T.backend_reason(cpu, ["mlx-cpu 0.32.4"], False, "linux")
    assert "GPU" in T.backend_reason(CUDA, ["mlx-cuda-12 0.32.4"], True, "linux")
    assert "Metal" in T.backend_reason(T.Device(backend="metal"), [], False, "darwin")


def test_probe_backend_says_what_mlx_uses_here():
    b = T.probe_backend()
    assert b.device is not None and b.device.backend in ("cpu", "metal", "cuda") and b.why


def test_old_journals_get_the_device_columns(tmp_path):
    path = tmp_path / "journal.db"
    Journal.create(path).close()
    conn = sqlite3.connect(path)  # as a journal made before the device columns
    for col in ("device", *T.READINGS):
        conn.execute(f"ALTER TABLE metrics DROP COLUMN {col}")
    conn.execute(
        "INSERT INTO metrics (job, ts, step, global_step, loss, lr, tokens_per_s, peak_mem_gb, "
        "trained_tokens) VALUES ('0001', '2026-01-01T00:00:00.000000Z', 5, 5, 1.0, 0.1, 10, 0.2, 50)"
    )
    conn.commit()
    conn.close()
    ro = Journal.open_readonly(path)  # a viewer changes nothing: it reads NULL
    assert ro.last_metrics()["0001"]["device"] is None
    ro.close()
    j = Journal.open(path)
    m = Metrics(
        step=10,
        global_step=10,
        loss=0.9,
        lr=0.1,
        tokens_per_s=11,
        peak_mem_gb=0.2,
        trained_tokens=100,
        device="cuda:0 NVIDIA H100",
        device_temp_c=64.0,
        rss_gb=1.5,
    )
    j.record_metric("0001", m)
    last = j.last_metrics()["0001"]
    assert last["device"] == "cuda:0 NVIDIA H100" and last["device_temp_c"] == 64.0
    assert len(j.metric_rows("0001")) == 2 and j.metric_rows("0001")[0][-1] is None
    j.close()


def test_status_line_of_a_cuda_and_a_cpu_report():
    gpu = {
        "device": "cuda:0 NVIDIA GeForce RTX 4090",
        "device_mem_used_gb": 20.0,
        "device_mem_total_gb": 24.0,
        "device_temp_c": 71.0,
        "device_util_pct": 97.0,
        "device_power_w": 312.5,
        "mem_active_gb": 18.2,
        "mem_cache_gb": 0.9,
        "rss_gb": 3.1,
        "swap_gb": 0.0,
    }
    line = device_line(gpu)
    assert line.startswith(
        "cuda:0 NVIDIA GeForce RTX 4090  memory 20.00 GB / 24.00 GB (83 %)  71 °C"
    )
    assert "util 97 %" in line and "312 W" in line and "MLX 18.20 GB active + 900 MB cache" in line
    cpu = device_line({"device": "cpu AMD EPYC", "mem_active_gb": 0.05, "rss_gb": 0.4})
    assert "°C" not in cpu and cpu.startswith("cpu AMD EPYC  ·  MLX 50 MB active")
    assert device_line({"step": 3}) == ""  # a report from before the readings


def test_doctor_flags_a_hot_full_gpu_through_the_seam(ws, capsys, monkeypatch):
    from helpers import run

    monkeypatch.setenv(
        T.FAKE_ENV,
        '{"device": "NVIDIA GeForce RTX 4090", "device_temp_c": 91, "device_mem_used_gb": 23.5,'
        ' "device_mem_total_gb": 24}',
    )
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    import json

    found = {f["check"]: f for f in json.loads(out)["findings"]}
    gpu = found["gpu"]
    assert gpu["severity"] == "warning"
    assert "91 °C, above max_temperature_c = 85" in gpu["message"]
    assert "98 % full" in gpu["message"] and "max_memory_pct = 95" in gpu["message"]
    assert found["backend"]["message"].startswith("workers train on ")
    # the thresholds are ftctl.yaml's
    text = (ws / "ftctl.yaml").read_text()
    text = text.replace("max_temperature_c: 85.0", "max_temperature_c: 95").replace(
        "max_memory_pct: 95.0", "max_memory_pct: 99"
    )
    (ws / "ftctl.yaml").write_text(text)
    code, out, _ = run(capsys, "doctor", "--json", "--home", ws)
    gpu = {f["check"]: f for f in json.loads(out)["findings"]}["gpu"]
    assert (
        gpu["severity"] == "ok"
        and "91 °C" in gpu["message"]
        and "limits 95 °C, 99 %" in gpu["message"]
    )


def test_kernel_xids_since_the_attempt_started(monkeypatch):
    """The NVRM Xid lines dmesg has from the attempt's start on (its stamps: seconds since boot)."""
    import subprocess

    from ftctl.adapters import system

    log = (
        "[  100.000001] NVRM: Xid (PCI:0000:2b:00): 63, pid=1896, Row Remapper: New row marked\n"
        "[ 5000.250000] usb 1-1: new device\n"
        "[ 5001.500000] NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus.\n"
    )
    monkeypatch.setattr(system.psutil, "boot_time", lambda: 1_000_000.0)
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, log, "")
    )
    got = system.kernel_xids(since=1_000_000.0 + 4_000)
    assert got == ["[ 5001.500000] NVRM: Xid (PCI:0000:2b:00): 79, GPU has fallen off the bus."]

    def denied(*a, **k):
        raise OSError("dmesg: read kernel buffer failed: Operation not permitted")

    monkeypatch.setattr(subprocess, "run", denied)
    assert system.kernel_xids(since=0) == []
