#!/usr/bin/env bash
# The device check: ftctl on a Linux machine with an NVIDIA GPU and no registry access, in one go.
#
#   bench/device_check.sh WHEELS_DIR [WORK_DIR]
#
# WHEELS_DIR holds every wheel `.[cuda,test]` needs, and setuptools for the build (made once on a machine
# with registry access, same Python version and platform:  bench/device_check.sh --fetch WHEELS_DIR). WORK_DIR (default a temp
# folder) gets the virtual environment and the logs. The script:
#   1. makes a venv and installs ftctl with the CUDA extra from WHEELS_DIR only (pip --no-index);
#      DEVICE_CHECK_SYSTEM_SITE=1 lets the venv see the system's packages (NVIDIA's CUDA libraries
#      already installed there, for instance);
#   2. says what it found: nvidia-smi, the backend a worker will use (ftctl doctor's backend and gpu checks);
#   3. runs the GPU-marked tests (tests/test_gpu.py: telemetry, kill/resume and the memory guard on the
#      GPU), printing the skip reasons — on a machine without a CUDA device they all skip, and it says so;
#   4. prints ftctl lora vs mlx_lm.lora wall and MFU for the same job (bench/mfu.py) on that device.
# It exits 0 when every step ran (skips included: the output says why), 1 otherwise. A few minutes on a GPU.
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
# what is installed: the CUDA backend and the tests (DEVICE_CHECK_EXTRAS=cpu,test rehearses on a CPU box)
extras="${DEVICE_CHECK_EXTRAS:-cuda,test}"

if [ "${1:-}" = "--fetch" ]; then
    [ -n "${2:-}" ] || { echo "usage: $0 --fetch WHEELS_DIR" >&2; exit 2; }
    mkdir -p "$2" && "$py" -m pip download --dest "$2" "$here[$extras]" "setuptools>=68" wheel && \
        echo "wheels for .[$extras] (and the build's setuptools) in $2"
    exit $?
fi
[ -n "${1:-}" ] && [ -d "$1" ] || { echo "usage: $0 WHEELS_DIR [WORK_DIR]  (or: $0 --fetch WHEELS_DIR)" >&2; exit 2; }
wheels="$(cd "$1" && pwd)"
work="${2:-$(mktemp -d -t ftctl-device-check.XXXXXX)}"
mkdir -p "$work"
status=0
step() { echo; echo "== $*"; }

step "1. install ftctl[$extras] from $wheels (no registry)"
venv_opts=()
[ "${DEVICE_CHECK_SYSTEM_SITE:-0}" = 1 ] && venv_opts=(--system-site-packages)
"$py" -m venv "${venv_opts[@]}" "$work/venv" || exit 1
vpy="$work/venv/bin/python"
if ! "$vpy" -m pip install -q --no-index --find-links "$wheels" -e "$here[$extras]" > "$work/pip.log" 2>&1; then
    tail -20 "$work/pip.log"; echo "install failed: the wheels in $wheels do not cover .[$extras]"; exit 1
fi
"$vpy" -m pip list 2>/dev/null | grep -iE '^(mlx|mlx-cuda|mlx-cpu|nvidia-ml-py|ftctl) ' | sed 's/^/   /'

step "2. the machine"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,temperature.gpu --format=csv,noheader | sed 's/^/   /'
else
    echo "   no nvidia-smi: no NVIDIA driver on this machine"
fi
"$vpy" - <<'EOF'
from ftctl.adapters import blas, telemetry
b = telemetry.probe_backend(blas.choose("auto").env)
label = b.device.label() if b.device else "nothing (MLX cannot start)"
print(f"   a training worker would run on: {label}\n   why: {b.why}")
r = telemetry.host_readings()
print(f"   NVML: {r}" if r else "   NVML: no NVIDIA GPU readable (no driver, no device, or nvidia-ml-py missing)")
if b.device is None or b.device.backend not in ("cuda", "metal"):
    print("   NO GPU: the GPU tests below skip, and the benchmark runs on the CPU")
EOF

step "3. the GPU-marked tests (skipped with the reason where there is no GPU)"
(cd "$here" && "$vpy" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py) || status=1

step "4. ftctl lora vs mlx_lm.lora: wall and MFU, same job, same device"
(cd "$here" && "$vpy" bench/mfu.py --iters "${DEVICE_CHECK_ITERS:-100}" --rounds "${DEVICE_CHECK_ROUNDS:-2}") || status=1

echo
echo "device check done (logs and venv in $work); exit $status"
exit $status
