#!/usr/bin/env bash
# Fresh rented GPU box (Ubuntu) -> a C compiler and Python headers (torch.compile needs them), a .venv with torch
# for this driver's CUDA, the requirements, a GPU self-test (bf16 matmul + compiled bf16 training steps of the seed
# preset at the batch it recommends: samples/s, MFU, peak memory), and optionally a slice of text-to-image-2M.
# Idempotent: a re-run skips every step that is already done (packages, venv, torch, requirements, data).
#
#   bash setup_gpu.sh                     # venv + torch + requirements + self-test
#   bash setup_gpu.sh --prep t2i 100000   # ... then python prep_dataset.py text-to-image-2m --limit 100000
#   bash setup_gpu.sh --dry_run           # print the plan (each command), install nothing
#
# Left out on purpose: installing the NVIDIA driver or the CUDA toolkit (rented boxes come with a driver; the
# torch wheels carry their own CUDA runtime), conda, and Docker.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash setup_gpu.sh [--dry_run] [--prep t2i N] [--cuda TAG] [--python PYTHON] [--batch B] [--no_selftest]

Set up this repository on a fresh Ubuntu GPU box:
  1. check the GPU (nvidia-smi), Python (>= 3.9) and the shared memory the loader workers use (/dev/shm; in a
     container it is often 64 MB: run the container with --ipc=host or --shm-size=16g)
  2. apt-get install a C compiler and the Python headers when missing: torch.compile's Triton builds a small
     C helper with them the first time it runs
  3. create .venv (skipped when it exists)
  4. install torch built for the driver's CUDA (cu130/cu128/cu126/cu124/cu121/cu118 from
     download.pytorch.org, else the default PyPI wheel); skipped when torch already sees the GPU
  5. pip install -r requirements.txt (skipped when requirements.txt has not changed since the last run)
  6. GPU self-test: a bf16 matmul check, then compiled bf16 training steps of the seed preset at the batch
     it recommends for this GPU's memory; prints samples/s and MFU, and the peak memory
  7. with --prep t2i N: python prep_dataset.py text-to-image-2m --out data/t2i --limit N
     (skipped when data/t2i already holds a run of >= N)
  8. print the next command: the design card's python train.py --batch 1024 --max_lr 3e-4, whose defaults on
     CUDA are the seed preset on data/t2i (--batch B --accum 1024/B when the self-test's batch is smaller)

options:
  --dry_run        print each command it would run; runs nothing that installs or downloads
  --prep t2i N     also build N samples of text-to-image-2M into data/t2i
  --cuda TAG       wheel index to use instead of the detected one: cu130, cu128, ..., or "pypi"
  --python PYTHON  the interpreter that creates .venv (default: python3)
  --batch B        self-test batch size (default: auto, the largest power of two that fits this GPU)
  --no_selftest    skip step 6
  -h, --help       this message
EOF
}

die() { echo "setup_gpu.sh: error: $*" >&2; exit 1; }
bad_usage() { echo "setup_gpu.sh: error: $*" >&2; echo "(bash setup_gpu.sh --help for usage)" >&2; exit 2; }

DRY=0 PREP_N="" CUDA_TAG="" PYTHON=python3 BATCH=auto SELFTEST=1
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry_run | --dry-run) DRY=1 ;;
        --prep)
            [[ $# -ge 3 ]] || bad_usage "--prep needs a dataset and a count, e.g. --prep t2i 100000"
            [[ $2 == t2i ]] || bad_usage "--prep: unknown dataset '$2' (only t2i: text-to-image-2M)"
            [[ $3 =~ ^[1-9][0-9]*$ ]] || bad_usage "--prep t2i N: N must be a positive integer, got '$3'"
            PREP_N=$3; shift 2 ;;
        --cuda)
            [[ $# -ge 2 && $2 =~ ^(cu[0-9]+|pypi)$ ]] || bad_usage "--cuda needs a tag like cu128, or pypi"
            CUDA_TAG=$2; shift ;;
        --python)
            [[ $# -ge 2 ]] || bad_usage "--python needs an interpreter"
            PYTHON=$2; shift ;;
        --batch)
            [[ $# -ge 2 && $2 =~ ^([1-9][0-9]*|auto)$ ]] || bad_usage "--batch needs a positive integer or auto"
            BATCH=$2; shift ;;
        --no_selftest) SELFTEST=0 ;;
        *) bad_usage "unknown argument '$1'" ;;
    esac
    shift
done

cd "$(dirname "$0")"  # the repository root: .venv, requirements.txt and data/ live here
VENV=.venv
PY=$VENV/bin/python

SUDO=""
((EUID == 0)) || SUDO=sudo
step() { printf '\n== %s\n' "$*"; }
skip() { echo "skip: $*"; }
run() {  # print the command; run it unless --dry_run
    echo "+ $*"
    if ((!DRY)); then "$@"; fi
}

# ---------------------------------------------------------------- 1. checks (read-only, also in a dry run)
step "checking the GPU"
CUDA_MAJOR="" CUDA_MINOR=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
    msg="no NVIDIA GPU found (nvidia-smi missing): install the NVIDIA driver (Ubuntu: sudo ubuntu-drivers install)"
    msg+=" or run this on a GPU box"
    ((DRY)) || die "$msg"
    echo "warning: $msg; --dry_run goes on with the default PyPI wheel"
elif ! smi=$(nvidia-smi 2>&1); then
    msg="nvidia-smi failed, so the driver is not usable: ${smi%%$'\n'*}"
    ((DRY)) || die "$msg"
    echo "warning: $msg; --dry_run goes on with the default PyPI wheel"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
    # the header says "CUDA Version: 12.4": the newest CUDA this driver runs, so the newest wheel it can load
    if [[ $smi =~ CUDA\ Version:\ *([0-9]+)\.([0-9]+) ]]; then
        CUDA_MAJOR=${BASH_REMATCH[1]} CUDA_MINOR=${BASH_REMATCH[2]}
        echo "driver supports CUDA $CUDA_MAJOR.$CUDA_MINOR"
    else
        echo "warning: no 'CUDA Version' in nvidia-smi's output; using the default PyPI wheel"
    fi
fi

step "checking Python"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (Ubuntu: sudo apt-get install -y python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    die "Python >= 3.9 needed, $PYTHON is $("$PYTHON" -V 2>&1)"
echo "$("$PYTHON" -V 2>&1) at $(command -v "$PYTHON")"

# driver CUDA -> the newest PyTorch wheel index it can run (wheels bring their own CUDA runtime; the driver only
# has to be at least as new). The cu121/cu124 indexes stop at older torch releases, which still satisfy
# requirements.txt (torch >= 2.1).
wheel_tag() {
    local v=$((10#$1 * 100 + 10#$2)) t
    for t in 1300:cu130 1208:cu128 1206:cu126 1204:cu124 1201:cu121 1108:cu118; do
        if ((v >= ${t%%:*})); then echo "${t#*:}"; return; fi
    done
    echo pypi  # too old for any CUDA wheel index we know: let pip pick
}
if [[ -z $CUDA_TAG ]]; then
    CUDA_TAG=pypi
    [[ -n $CUDA_MAJOR ]] && CUDA_TAG=$(wheel_tag "$CUDA_MAJOR" "$CUDA_MINOR")
fi
echo "torch wheel: $CUDA_TAG"

step "checking shared memory (/dev/shm)"
# loader workers hand batches to the training process through /dev/shm: up to 15 workers per GPU x 2 batches in
# flight x 154 MB (batch 1024 at 224 px) is a few GB; Docker's default of 64 MB ends in a bus error
SHM_WANT_GIB=8
shm_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}') || true
if [[ ! $shm_kb =~ ^[0-9]+$ ]]; then
    echo "warning: no /dev/shm here; loader workers need it (in a container: docker run --ipc=host or --shm-size=16g)"
elif ((shm_kb < SHM_WANT_GIB * 1024 * 1024)); then
    echo "warning: /dev/shm has only $((shm_kb / 1024)) MiB free; loader workers pass batches through it (a few GB"
    echo "  at --batch 1024): restart the container with --ipc=host or --shm-size=16g (or train with fewer --workers)"
else
    echo "/dev/shm: $((shm_kb / 1024 / 1024)) GiB free (ok)"
fi

# ---------------------------------------------------------------- 2. build tools for torch.compile
step "C compiler and Python headers (Triton builds a small C helper the first time torch.compile runs)"
PKGS=()
if [[ -n ${CC:-} ]]; then  # Triton compiles with $CC when it is set, else with clang or gcc
    command -v "$CC" >/dev/null 2>&1 || die "CC=$CC is not an executable; Triton compiles with \$CC: fix or unset it"
    echo "C compiler: $CC (from \$CC)"
elif cc_path=$(command -v gcc || command -v clang); then
    echo "C compiler: $cc_path"
else
    echo "no C compiler (gcc or clang) found"
    PKGS+=(build-essential)
fi
if "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    echo "Python headers: found"
else
    pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    echo "no Python.h for Python $pyver"
    PKGS+=("python$pyver-dev")
fi
if ((${#PKGS[@]})); then
    command -v apt-get >/dev/null 2>&1 ||
        die "no apt-get: install ${PKGS[*]} (a C compiler, the Python headers) with this system's package manager"
    run $SUDO apt-get update
    run $SUDO apt-get install -y "${PKGS[@]}"
else
    skip "both present"
fi

# ---------------------------------------------------------------- 3. the virtual environment
step "virtual environment $VENV"
if [[ -x $PY ]]; then
    skip "$VENV exists"
else
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then  # Ubuntu ships venv in its own package
        echo "$PYTHON has no venv/ensurepip module: installing python3-venv"
        run $SUDO apt-get update
        run $SUDO apt-get install -y python3-venv
    fi
    run "$PYTHON" -m venv "$VENV"
    run "$PY" -m pip install --upgrade pip
fi

# ---------------------------------------------------------------- 4. torch for this CUDA
step "torch"
if [[ -x $PY ]] && "$PY" -c 'import sys, torch; sys.exit(not (torch.cuda.is_available() and torch.version.cuda))' \
    >/dev/null 2>&1; then
    skip "torch $("$PY" -c 'import torch; print(torch.__version__)') already sees the GPU"
elif [[ $CUDA_TAG == pypi ]]; then
    run "$PY" -m pip install torch
else
    run "$PY" -m pip install torch --index-url "https://download.pytorch.org/whl/$CUDA_TAG"
fi

# ---------------------------------------------------------------- 5. the other requirements
step "requirements.txt"
STAMP=$VENV/.requirements.sha256  # the hash of the requirements.txt last installed
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [[ -f $STAMP && $(<"$STAMP") == "$want" ]]; then
    skip "requirements.txt unchanged since the last install"
else
    run "$PY" -m pip install -r requirements.txt  # torch is already there, so pip keeps the CUDA build
    if ((!DRY)); then echo "$want" >"$STAMP"; fi
fi

# ---------------------------------------------------------------- 6. GPU self-test
SELFTEST_PY=$(cat <<'EOF'
import sys, time
import torch
import clip

assert torch.cuda.is_available(), "torch cannot see the GPU (a CPU wheel, or a driver older than the wheel's CUDA)"
total = torch.cuda.get_device_properties(0).total_memory
print(f"{torch.cuda.get_device_name()}: {total / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")

# bf16 matmul against a float64 reference: bf16 keeps 8 mantissa bits, so ~3e-3 relative error is normal
a, b = torch.randn(2048, 2048, device="cuda"), torch.randn(2048, 2048, device="cuda")
ref = a.double() @ b.double()
err = ((a.bfloat16() @ b.bfloat16()).double() - ref).norm().item() / ref.norm().item()
assert err < 2e-2, f"bf16 matmul relative error {err:.1e} is too large"
print(f"bf16 matmul: relative error {err:.1e} (ok)")

# the batch to recommend: the seed preset in bf16 takes ~4 GiB (weights, AdamW state, workspace) plus ~56 MiB of
# activations per sample (~60 GiB at 1024); the largest power of two that fits in 90% of this GPU (8 to 4096)
config = clip.get_config("seed")
fits = (0.9 * total - 4 * 2**30) / (56 * 2**20)
B = int(sys.argv[1]) if sys.argv[1] != "auto" else 2 ** max(3, min(12, int(max(fits, 1)).bit_length() - 1))
torch.backends.cuda.matmul.allow_tf32 = True
S, T, V = config.vision.img_size, config.text.context_length, config.text.vocab_size


def steps(B, n):
    """n compiled bf16 training steps of the seed preset at batch B, as train.py runs them: (seconds of the last
    n - 1, the last loss, parameters)."""
    torch.manual_seed(0)
    model = clip.CLIP(config).cuda()
    opt = clip.configure_optimizers(model, 0.2, 1e-4)
    fwd = torch.compile(model)  # Triton: where a missing C compiler or Python.h would fail
    images = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, device="cuda")  # (B, 3, S, S) uint8
    tokens = torch.randint(1, V - 2, (B, T), device="cuda")  # (B, T)
    tokens[:, T // 2] = V - 1  # eot (the highest id) mid-caption: the text tower pools there
    for i in range(n):
        if i == 1:  # the first step compiles and allocates: not timed
            torch.cuda.synchronize()
            t0 = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = fwd(images, tokens)  # uint8 images are normalised inside the compiled forward
        loss = clip.clip_loss(outs.image.float(), outs.text.float(), outs.logit_scale.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert torch.isfinite(loss), f"loss is {loss.item()}"
    return time.time() - t0, loss.item(), model.num_params()


while True:
    torch.cuda.reset_peak_memory_stats()
    try:
        dt, loss, params = steps(B, 4)
        break
    except torch.cuda.OutOfMemoryError:
        if sys.argv[1] != "auto" or B <= 8:
            raise
        print(f"batch {B} does not fit; trying {B // 2}")
        B //= 2
        torch.cuda.empty_cache()
sps = 3 * B / dt
mfu = clip.estimate_mfu(config, sps)
peak = torch.cuda.max_memory_allocated()
print(f"seed preset ({params / 1e6:.0f}M params), batch {B}, bf16, compiled: loss {loss:.3f}, {sps:.0f} samples/s, MFU "
      + (f"{mfu:.1%}" if mfu is not None else "unknown (no bf16 peak for this GPU in clip.PEAK_FLOPS)")
      + f", peak memory {peak / 2**30:.1f} of {total / 2**30:.0f} GiB")
print(f"recommended: --batch {B} per GPU" + (" (with --accum N for a larger effective batch)" if B < 1024 else ""))
EOF
)
step "GPU self-test"
if ((SELFTEST)); then
    echo "+ $PY - $BATCH  # stdin: the self-test above (bf16 matmul check, compiled bf16 seed-preset steps)"
    if ((!DRY)); then  # its output also goes to a file: the batch it recommends shapes the next command below
        PYTHONUNBUFFERED=1 "$PY" - "$BATCH" <<<"$SELFTEST_PY" | tee "$VENV/.selftest.txt" ||
            die "GPU self-test failed (see above)"
    fi
else
    skip "--no_selftest"
fi

# ---------------------------------------------------------------- 7. data
DONE=data/t2i/.setup_gpu_limit  # written after a finished prep: the --limit it ran with
if [[ -n $PREP_N ]]; then
    step "text-to-image-2M: $PREP_N samples -> data/t2i"
    if [[ -f data/t2i/index.json && -f $DONE && $(<"$DONE") -ge $PREP_N ]]; then
        skip "data/t2i already holds a prep run of $(<"$DONE") samples"
    else  # prep_dataset.py resumes an interrupted or smaller run, keeping its finished shards
        run "$PY" prep_dataset.py text-to-image-2m --out data/t2i --limit "$PREP_N"
        if ((!DRY)); then echo "$PREP_N" >"$DONE"; fi
    fi
fi

# ---------------------------------------------------------------- the next command: the design card's run
# On CUDA, train.py's defaults are the seed preset on data/t2i once it holds a prepared set, bf16 and torch.compile.
# A self-test batch under 1024 becomes --batch B --accum 1024/B: the same batch-1024 gradient (GradCache), less memory.
step "done$( ((DRY)) && echo ' (dry run: nothing was installed)')"
TRAIN="--batch 1024"
rec=""
if ((SELFTEST && !DRY)); then
    rec=$(sed -n 's/^recommended: --batch \([1-9][0-9]*\) per GPU.*/\1/p' "$VENV/.selftest.txt")
fi
if [[ -n $rec ]] && ((rec < 1024 && 1024 % rec == 0)); then
    TRAIN="--batch $rec --accum $((1024 / rec))"
    echo "(the self-test's batch is $rec on this GPU: --accum $((1024 / rec)) keeps the card's batch of 1024)"
fi
TRAIN=". $VENV/bin/activate && python train.py $TRAIN --max_lr 3e-4"
if [[ -f data/t2i/index.json ]]; then
    n=""
    [[ -f $DONE ]] && n=" ($(<"$DONE") samples)"
    echo "next: $TRAIN"
    echo "      (the seed preset on data/t2i$n: train.py's defaults on CUDA once data/t2i is prepared)"
elif [[ -n $PREP_N ]]; then  # a dry run: the prep above has not run
    echo "next: $TRAIN"
    echo "      (the seed preset on data/t2i once the prep above has made it: train.py's defaults on CUDA)"
else
    echo "next: bash setup_gpu.sh --prep t2i 200000   # 200000 text-to-image-2M samples -> data/t2i (it skips what is done)"
    echo "then: $TRAIN"
    echo "      (the seed preset on data/t2i; without data/t2i, train.py on CUDA runs the small built-in demo)"
fi
