"""The checkpoint commit protocol: layout, verification, and faults at every write."""

import errno
import json
import os
import stat
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ftctl.adapters.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTERS,
    MANIFEST,
    OPTIMIZER,
    STATE,
    Checkpoint,
    CheckpointCorrupt,
    CheckpointWriter,
    Cursor,
    TrainState,
    adapter_sha256,
    checkpoint_files,
    checkpoint_step,
    discard_dir,
    list_checkpoint_dirs,
    load_checkpoint,
    publish_adapter,
    save_checkpoint,
    sha256,
    temp_dirs,
    verify_checkpoint,
)
from ftctl.adapters.fs import FS, FaultyFS

ERRNOS = [errno.ENOSPC, errno.EIO]


def payload(step: int, seed: int = 0, fine_tune_type: str = "lora") -> Checkpoint:
    """A checkpoint's contents: LoRA matrices, or for a full fine-tune the layers' own weights."""
    rng = np.random.default_rng([seed, step])
    if fine_tune_type == "full":
        adapters = {
            "model.layers.1.self_attn.q_proj.weight": mx.array(
                rng.normal(size=(16, 16)), mx.float32
            ),
            "model.layers.1.mlp.up_proj.weight": mx.array(rng.normal(size=(32, 16))).astype(
                mx.bfloat16
            ),
            "model.layers.1.input_layernorm.weight": mx.array(rng.normal(size=(16,))).astype(
                mx.float16
            ),
        }
    else:
        adapters = {
            "model.layers.0.self_attn.q_proj.lora_a": mx.array(
                rng.normal(size=(16, 4)), mx.float32
            ),
            "model.layers.0.self_attn.q_proj.lora_b": mx.array(
                rng.normal(size=(4, 16)), mx.float32
            ),
            "model.layers.1.mlp.up_proj.lora_a": mx.array(rng.normal(size=(16, 4))).astype(
                mx.bfloat16
            ),
            "model.layers.1.mlp.up_proj.lora_b": mx.array(rng.normal(size=(4, 32))).astype(
                mx.float16
            ),
        }
    optimizer = {"step": mx.array(step, mx.uint64), "learning_rate": mx.array(1e-3)}
    for k, v in adapters.items():
        optimizer[k + ".m"] = v.astype(mx.float32) * 0.1
        optimizer[k + ".v"] = v.astype(mx.float32) ** 2
    state = TrainState(
        job_step=step,
        global_step=100 + step,
        cursor=Cursor(epoch=step // 7, position=step % 7),
        seed=seed,
        eval_count=2,
        trained_tokens=1234 * step,
        train_loss=1.5,
        val_loss=None,
        config_sha256="ab" * 32,
    )
    lora = {"rank": 4, "scale": 20.0, "dropout": 0.0} if fine_tune_type != "full" else None
    config = {"fine_tune_type": fine_tune_type, "num_layers": 2, "lora_parameters": lora}
    return Checkpoint(adapters, config, optimizer, state)


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and mx.array_equal(a[k], b[k]).item()
        for k in a
    )


def save_ops(tmp_path, debris: bool) -> int:
    """How many write-class operations one save of step 20 takes when job_dir exists."""
    fs = FS()
    job = tmp_path / f"count-{debris}"
    save_checkpoint(job, payload(1))
    if debris:
        save_checkpoint(job, payload(20))
    save_checkpoint(job, payload(20), fs)
    return fs.ops


@pytest.mark.parametrize("fine_tune_type", ["lora", "full"])
def test_round_trip_keeps_every_dtype_and_the_state(tmp_path, fine_tune_type):
    ck = payload(40, fine_tune_type=fine_tune_type)
    info = save_checkpoint(tmp_path / "job", ck)
    path = tmp_path / "job" / "checkpoints" / "step-00000040"
    assert info.path == str(path) and info.step == 40 and info.global_step == 140
    assert sorted(os.listdir(path)) == sorted(
        [ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, STATE, MANIFEST]
    )
    assert info.bytes == sum((path / f).stat().st_size for f in os.listdir(path))
    assert info.manifest_sha256 == sha256((path / MANIFEST).read_bytes())
    back = load_checkpoint(path)
    assert same_arrays(back.adapters, ck.adapters)
    assert same_arrays(back.optimizer, ck.optimizer)
    assert back.optimizer["step"].dtype == mx.uint64
    assert back.state == ck.state
    assert back.adapter_config == ck.adapter_config
    # mlx can read the files directly too (the adapter file is what mlx-lm loads)
    assert same_arrays(mx.load(str(path / ADAPTERS)), ck.adapters)
    assert json.loads((path / STATE).read_bytes())["cursor"] == {"epoch": 5, "position": 5}


def test_equal_payloads_give_byte_identical_checkpoints(tmp_path):
    a = save_checkpoint(tmp_path / "a", payload(8))
    b = save_checkpoint(tmp_path / "b", payload(8))
    assert a.manifest_sha256 == b.manifest_sha256
    assert adapter_sha256(a.path) == adapter_sha256(b.path)


def test_files_are_private(tmp_path):
    info = save_checkpoint(tmp_path / "job", payload(3))
    assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o700
    for f in os.listdir(info.path):
        assert stat.S_IMODE(os.stat(os.path.join(info.path, f)).st_mode) == 0o600


def test_listing_sorts_by_step_and_finds_leftover_temp_dirs(tmp_path):
    job = tmp_path / "job"
    for step in (30, 5, 100):
        save_checkpoint(job, payload(step))
    (job / "checkpoints" / ".tmp-step-00000200-999").mkdir()
    (job / ".tmp-adapters-999").mkdir()
    (job / "checkpoints" / "notes").mkdir()
    assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] == [5, 30, 100]
    assert [p.name for p in temp_dirs(job)] == [".tmp-adapters-999", ".tmp-step-00000200-999"]
    assert list_checkpoint_dirs(tmp_path / "none") == [] and temp_dirs(tmp_path / "none") == []


@pytest.mark.parametrize("victim", [ADAPTERS, OPTIMIZER, STATE, ADAPTER_CONFIG])
def test_a_flipped_byte_is_caught_and_named(tmp_path, victim):
    info = save_checkpoint(tmp_path / "job", payload(10))
    f = os.path.join(info.path, victim)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(f, "wb").write(bytes(data))
    with pytest.raises(CheckpointCorrupt) as e:
        verify_checkpoint(info.path)
    assert e.value.file == victim and victim in str(e.value) and "sha256" in str(e.value)
    with pytest.raises(CheckpointCorrupt):
        load_checkpoint(info.path)


@pytest.mark.parametrize("victim", [ADAPTERS, OPTIMIZER])
def test_truncated_and_missing_files_are_caught_and_named(tmp_path, victim):
    info = save_checkpoint(tmp_path / "job", payload(10))
    f = os.path.join(info.path, victim)
    os.truncate(f, os.path.getsize(f) - 3)
    with pytest.raises(CheckpointCorrupt, match="bytes") as e:
        verify_checkpoint(info.path)
    assert e.value.file == victim
    os.unlink(f)
    with pytest.raises(CheckpointCorrupt, match="missing") as e:
        verify_checkpoint(info.path)
    assert e.value.file == victim


def test_manifest_problems(tmp_path):
    info = save_checkpoint(tmp_path / "job", payload(10))
    manifest = os.path.join(info.path, MANIFEST)
    good = open(manifest, "rb").read()
    open(manifest, "wb").write(good[:-20])
    with pytest.raises(CheckpointCorrupt, match="unreadable") as e:
        verify_checkpoint(info.path)
    assert e.value.file == MANIFEST
    m = json.loads(good)
    del m["files"][OPTIMIZER]
    open(manifest, "w").write(json.dumps(m))
    with pytest.raises(CheckpointCorrupt, match="does not list optimizer"):
        verify_checkpoint(info.path)
    os.unlink(manifest)
    with pytest.raises(CheckpointCorrupt, match="never completed") as e:
        verify_checkpoint(info.path)
    assert e.value.file == MANIFEST
    with pytest.raises(CheckpointCorrupt, match="does not exist"):
        verify_checkpoint(tmp_path / "job" / "checkpoints" / "step-00000099")


def test_unreadable_json_with_a_matching_hash_is_caught(tmp_path):
    info = save_checkpoint(tmp_path / "job", payload(10))
    bad = b'{"job_step": 10,'
    open(os.path.join(info.path, STATE), "wb").write(bad)
    manifest = os.path.join(info.path, MANIFEST)
    m = json.loads(open(manifest).read())
    m["files"][STATE] = {"sha256": sha256(bad), "bytes": len(bad)}
    open(manifest, "w").write(json.dumps(m))
    with pytest.raises(CheckpointCorrupt, match="unreadable JSON") as e:
        verify_checkpoint(info.path)
    assert e.value.file == STATE


def test_a_stale_final_dir_is_replaced(tmp_path):
    job = tmp_path / "job"
    stale = job / "checkpoints" / "step-00000020"
    stale.mkdir(parents=True)
    (stale / ADAPTERS).write_bytes(b"half")
    save_checkpoint(job, payload(20))
    verify_checkpoint(stale)
    assert temp_dirs(job) == []


def test_a_leftover_temp_dir_of_the_same_pid_is_cleared(tmp_path):
    job = tmp_path / "job"
    leftover = job / "checkpoints" / f".tmp-step-00000020-{os.getpid()}"
    leftover.mkdir(parents=True)
    (leftover / ADAPTERS).write_bytes(b"junk")
    save_checkpoint(job, payload(20))
    assert temp_dirs(job) == []


def test_fs_write_bytes_is_exclusive(tmp_path):
    fs = FS()
    fs.write_bytes(tmp_path / "f", b"x")
    with pytest.raises(FileExistsError):
        fs.write_bytes(tmp_path / "f", b"y")
    assert fs.ops == 2


def test_faulty_fs_fails_once_at_the_chosen_op_and_leaves_a_partial_file(tmp_path):
    fs = FaultyFS(fail_at=2)
    fs.mkdir(tmp_path / "d")
    with pytest.raises(OSError) as e:
        fs.write_bytes(tmp_path / "d" / "f", b"0123456789")
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "d" / "f") in str(e.value)
    assert (tmp_path / "d" / "f").read_bytes() == b"01234"
    fs.write_bytes(tmp_path / "d" / "g", b"ok")  # one fault only
    eio = FaultyFS(fail_at=1, err=errno.EIO)
    with pytest.raises(OSError) as e:
        eio.write_bytes(tmp_path / "d" / "h", b"data")
    assert e.value.errno == errno.EIO and not (tmp_path / "d" / "h").exists()


@pytest.mark.parametrize("err", ERRNOS)
@pytest.mark.parametrize("debris", [False, True])
def test_a_fault_at_any_write_leaves_the_previous_checkpoint_intact(tmp_path, err, debris):
    total = save_ops(tmp_path, debris)
    assert total == (12 if debris else 10)
    for n in range(1, total + 1):
        job = tmp_path / f"job-{n}"
        prev = save_checkpoint(job, payload(10))
        final = job / "checkpoints" / "step-00000020"
        if debris:  # a half-written dir with the final name, e.g. from a crash mid-copy
            final.mkdir()
            (final / ADAPTERS).write_bytes(b"half")
        fs = FaultyFS(fail_at=n, err=err)
        if debris and n == total:
            # removing the replaced debris after the commit is best effort: the save
            # succeeded, and the leftover is an ordinary .tmp- dir for cleanup
            save_checkpoint(job, payload(20), fs)
            assert fs.failed and [p.name for p in temp_dirs(job)] == [
                f".tmp-step-00000020-{os.getpid()}-replaced"
            ]
            verify_checkpoint(final)
            continue
        with pytest.raises(OSError) as e:
            save_checkpoint(job, payload(20), fs)
        assert e.value.errno == err and fs.failed
        verify_checkpoint(prev.path)
        assert load_checkpoint(prev.path).state.job_step == 10
        assert temp_dirs(job) == []
        if final.exists():
            # only the debris put back, or the new checkpoint if only the last fsync failed
            if (final / MANIFEST).exists():
                verify_checkpoint(final)
            else:
                assert debris and os.listdir(final) == [ADAPTERS]
        healthy = save_checkpoint(job, payload(20))
        verify_checkpoint(healthy.path)
        assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] == [10, 20]


@pytest.mark.parametrize("err", ERRNOS)
def test_a_fault_while_publishing_keeps_the_previous_adapter(tmp_path, err):
    job = tmp_path / "count"
    c1 = save_checkpoint(job, payload(10))
    c2 = save_checkpoint(job, payload(20))
    publish_adapter(job, c1.path)
    fs = FS()
    publish_adapter(job, c2.path, fs)
    total = fs.ops
    assert total == 10
    for n in range(1, total + 1):
        job = tmp_path / f"job-{n}"
        c1 = save_checkpoint(job, payload(10))
        c2 = save_checkpoint(job, payload(20))
        first, sha1 = publish_adapter(job, c1.path)
        faulty = FaultyFS(n, err)
        if n == total:  # best-effort removal of the replaced adapter dir
            publish_adapter(job, c2.path, faulty)
            assert faulty.failed and adapter_sha256(first) == adapter_sha256(c2.path)
            assert len(temp_dirs(job)) == 1
            continue
        with pytest.raises(OSError):
            publish_adapter(job, c2.path, faulty)
        verify_checkpoint(first)
        assert adapter_sha256(first) in (sha1, adapter_sha256(c2.path))
        assert temp_dirs(job) == []
        path, sha2 = publish_adapter(job, c2.path)
        assert sha2 == adapter_sha256(c2.path) == adapter_sha256(path)


def test_publish_copies_the_adapter_files(tmp_path):
    job = tmp_path / "job"
    info = save_checkpoint(job, payload(7))
    path, sha = publish_adapter(job, info.path)
    assert path == job / "adapters"
    assert sorted(os.listdir(path)) == sorted([ADAPTERS, ADAPTER_CONFIG, MANIFEST])
    for f in (ADAPTERS, ADAPTER_CONFIG):
        assert (path / f).read_bytes() == open(os.path.join(info.path, f), "rb").read()
    assert sha == adapter_sha256(path) == adapter_sha256(info.path)
    verify_checkpoint(path)
    with pytest.raises(CheckpointCorrupt, match="not a checkpoint"):
        load_checkpoint(path)


def test_publish_refuses_a_corrupt_checkpoint(tmp_path):
    job = tmp_path / "job"
    info = save_checkpoint(job, payload(7))
    os.truncate(os.path.join(info.path, ADAPTERS), 10)
    with pytest.raises(CheckpointCorrupt):
        publish_adapter(job, info.path)
    assert not (job / "adapters").exists() and temp_dirs(job) == []


def test_discard_dir_removes_a_checkpoint_whole(tmp_path):
    job = tmp_path / "job"
    a = save_checkpoint(job, payload(5))
    b = save_checkpoint(job, payload(10))
    discard_dir(a.path)
    assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] == [10]
    assert temp_dirs(job) == []
    verify_checkpoint(b.path)


def test_safetensors_chunks_are_standard_safetensors(tmp_path):
    from safetensors.numpy import load

    from ftctl.adapters.checkpoint import read_safetensors, safetensors_chunks

    arrays = {
        "t": mx.arange(12, dtype=mx.float32).reshape(3, 4).T,  # not contiguous
        "h": mx.arange(5, dtype=mx.float16),
        "step": mx.array(7, mx.uint64),
        "mask": mx.array([True, False, True]),
        "i": mx.array([[-1, 2]], mx.int32),
    }
    FS().write_bytes(tmp_path / "x.safetensors", safetensors_chunks(arrays))
    data = (tmp_path / "x.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") % 8 == 0
    theirs = load(data)  # the reference implementation reads it
    for k, v in arrays.items():
        assert np.array_equal(theirs[k], np.array(v)) and theirs[k].shape == v.shape
    assert same_arrays(read_safetensors(data), arrays)
    assert same_arrays(mx.load(str(tmp_path / "x.safetensors")), arrays)
    bf = {"w": mx.array([1.5, -2.25, 3e-3]).astype(mx.bfloat16)}
    FS().write_bytes(tmp_path / "bf.safetensors", safetensors_chunks(bf))
    assert same_arrays(mx.load(str(tmp_path / "bf.safetensors")), bf)


# ---------------------------------------------------------------------------- the background writer


def test_the_writer_writes_in_order_and_reports_after_the_rename(tmp_path):
    job = tmp_path / "job"
    seen = []

    def written(record):
        verify_checkpoint(record.path)  # durable under its final name before it is reported
        seen.append(record.step)

    w = CheckpointWriter(job, None, written)
    waits = []
    for step in (5, 10, 15):
        ck = payload(step)
        waits.append(w.submit(checkpoint_files(ck), ck.state))
    w.wait()
    assert seen == [5, 10, 15] and not w.busy() and all(x >= 0 for x in waits)
    assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] == [5, 10, 15]
    sync = save_checkpoint(tmp_path / "sync", payload(15))
    assert (job / "checkpoints" / "step-00000015" / MANIFEST).read_bytes() == (
        Path(sync.path) / MANIFEST
    ).read_bytes()


@pytest.mark.parametrize("err", ERRNOS)
def test_a_fault_at_any_write_of_a_background_save_surfaces_in_the_caller(tmp_path, err):
    """The async twin of the test above: every write operation of checkpoint 20 fails in turn on the
    writer thread; the caller gets that very OSError from check()/wait()/submit(), once; the previous
    checkpoint stays intact; nothing is reported; a healthy retry commits."""
    total = save_ops(tmp_path, debris=False)
    for n in range(1, total + 1):
        job = tmp_path / f"job-{n}"
        prev = save_checkpoint(job, payload(10))
        seen = []
        fs = FaultyFS(fail_at=n, err=err)
        w = CheckpointWriter(job, fs, lambda r: seen.append(r.step))
        ck = payload(20)
        w.submit(checkpoint_files(ck), ck.state)
        with pytest.raises(OSError) as e:
            if n % 2:
                w.wait()
            else:  # the next checkpoint coming due finds the error first
                w.submit(checkpoint_files(payload(30)), payload(30).state)
        assert e.value.errno == err and fs.failed
        w.check()  # raised once
        # a failed write is never reported (not even a failed fsync after the rename)
        assert seen == [], n
        verify_checkpoint(prev.path)
        assert temp_dirs(job) == []
        assert [checkpoint_step(p) for p in list_checkpoint_dirs(job)] in ([10], [10, 20])
        w2 = CheckpointWriter(job, None, lambda r: seen.append(r.step))
        w2.submit(checkpoint_files(ck), ck.state)
        w2.wait()
        verify_checkpoint(job / "checkpoints" / "step-00000020")


@pytest.mark.parametrize("fine_tune_type", ["lora", "full"])
def test_a_kill_during_a_background_write_leaves_the_previous_or_the_new_checkpoint(
    tmp_path, fine_tune_type
):
    """SIGKILL at the writer thread's crash points (it kills the whole process, training thread
    included): afterwards the newest complete checkpoint verifies, and only .tmp- debris is left."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import payload
        from ftctl.adapters.checkpoint import CheckpointWriter, checkpoint_files, save_checkpoint
        job = sys.argv[1]
        save_checkpoint(job, payload(10, fine_tune_type={fine_tune_type!r}))
        w = CheckpointWriter(job, None, lambda r: print("reported", r.step, flush=True))
        ck = payload(20, fine_tune_type={fine_tune_type!r})
        w.submit(checkpoint_files(ck), ck.state)
        while True:  # "training" goes on until the writer thread's crash point kills the process
            time.sleep(0.01)
    """)
    for point, want in (("after_temp_write", [10]), ("after_rename", [10, 20])):
        job = tmp_path / point
        env = {**os.environ, "FTCTL_CRASH_AT": f"{point}:120:{tmp_path / (point + '.marker')}"}
        p = subprocess.run(
            [sys.executable, "-c", script, str(job)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == -9, p.stderr
        assert "reported" not in p.stdout
        assert [checkpoint_step(d) for d in list_checkpoint_dirs(job)] == want
        for d in list_checkpoint_dirs(job):
            verify_checkpoint(d)
        assert all(t.name.startswith(".tmp-step-00000020-") for t in temp_dirs(job))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_nonfinite_tensors_finds_inf_and_nan_in_the_buffers(dtype):
    from ftctl.adapters.checkpoint import nonfinite_tensors, safetensors_chunks

    big = mx.zeros((3000, 700), dtype)
    arrays = {
        "ok": mx.array([1.0, -2.5, 65000.0 if dtype != mx.float16 else 60000.0], dtype),
        "nan": mx.array([0.0, float("nan")], dtype),
        "inf": mx.array([-float("inf"), 1.0], dtype),
        "late": mx.concatenate([big.reshape(-1), mx.array([float("inf")], dtype)]),
        "ints": mx.array([2**31 - 1], mx.int32),
    }
    assert nonfinite_tensors(safetensors_chunks(arrays), block=1 << 16) == ["inf", "late", "nan"]
    assert nonfinite_tensors(safetensors_chunks({"ok": arrays["ok"], "big": big})) == []
