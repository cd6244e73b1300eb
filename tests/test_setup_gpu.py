"""setup_gpu.sh on this CPU machine: --help, the dry-run plan without a GPU and with a fake nvidia-smi (the driver's
CUDA -> wheel index mapping), the build tools torch.compile needs and a small /dev/shm (on a PATH without a compiler,
a fake df), re-runs that skip what is done, argument errors, and shellcheck.
Every run works on a copy of the script in tmp_path, so nothing can touch the repository's .venv."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_exe(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def repo(tmp_path):
    """A bare copy of what the script needs: itself and requirements.txt."""
    d = tmp_path / "repo"
    d.mkdir()
    for f in ("setup_gpu.sh", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, f), d / f)
    return d


def no_gpu_path():
    """PATH with this Python's folder first and no folder that has an nvidia-smi."""
    dirs = [os.path.dirname(sys.executable)] + os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not os.path.exists(os.path.join(d, "nvidia-smi")))


def fake_gpu(tmp_path, cuda):
    """A PATH whose nvidia-smi prints what a real one prints for an H100 on a driver with this CUDA version."""
    write_exe(tmp_path / "fakebin" / "nvidia-smi", f"""#!/bin/sh
case "$*" in
  *--query-gpu*) echo "NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15" ;;
  *) echo "| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: {cuda}     |" ;;
esac
""")
    return str(tmp_path / "fakebin") + os.pathsep + no_gpu_path()


def run(repo, *args, path=None):
    return subprocess.run(["bash", str(repo / "setup_gpu.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path or no_gpu_path()})


def test_help(repo):
    r = run(repo, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: bash setup_gpu.sh")
    for words in ("--dry_run", "--prep t2i N", "--cuda TAG", "samples/s and MFU", "C compiler", "--shm-size"):
        assert words in r.stdout


def test_dry_run_without_gpu_prints_the_plan_and_installs_nothing(repo):
    r = run(repo, "--dry_run", "--prep", "t2i", "500")
    assert r.returncode == 0, r.stderr
    assert "no NVIDIA GPU found (nvidia-smi missing): " in r.stdout
    plan = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert plan == ["+ python3 -m venv .venv",
                    "+ .venv/bin/python -m pip install --upgrade pip",
                    "+ .venv/bin/python -m pip install torch",  # no CUDA known: the default PyPI wheel
                    "+ .venv/bin/python -m pip install -r requirements.txt",
                    plan[4],
                    "+ .venv/bin/python prep_dataset.py text-to-image-2m --out data/t2i --limit 500"]
    assert plan[4].startswith("+ .venv/bin/python - auto  # stdin: the self-test")  # the batch it recommends
    assert "dry run: nothing was installed" in r.stdout
    assert r.stdout.splitlines()[-2:] == [  # the design card's command, which trains on the data prepared above
        "next: . .venv/bin/activate && python train.py --batch 1024 --max_lr 3e-4",
        "      (the seed preset on data/t2i once the prep above has made it: train.py's defaults on CUDA)"]
    assert sorted(os.listdir(repo)) == ["requirements.txt", "setup_gpu.sh"]  # no .venv, no stamp, no data


def test_without_data_the_next_command_is_the_prep_then_the_card(repo):
    r = run(repo, "--dry_run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-3:-1] == [
        "next: bash setup_gpu.sh --prep t2i 200000   # 200000 text-to-image-2M samples -> data/t2i (it skips what is done)",
        "then: . .venv/bin/activate && python train.py --batch 1024 --max_lr 3e-4"]
    assert "without data/t2i, train.py on CUDA runs the small built-in demo" in r.stdout.splitlines()[-1]


def test_without_gpu_a_real_run_stops_at_once(repo):
    r = run(repo)
    assert r.returncode == 1
    assert "error: no NVIDIA GPU found (nvidia-smi missing): " in r.stderr
    assert sorted(os.listdir(repo)) == ["requirements.txt", "setup_gpu.sh"]


@pytest.mark.parametrize("cuda, tag", [("13.0", "cu130"), ("12.9", "cu128"), ("12.8", "cu128"), ("12.6", "cu126"),
                                       ("12.5", "cu124"), ("12.4", "cu124"), ("12.2", "cu121"), ("11.8", "cu118"),
                                       ("11.4", "pypi")])
def test_driver_cuda_picks_the_newest_wheel_it_can_run(repo, tmp_path, cuda, tag):
    r = run(repo, "--dry_run", path=fake_gpu(tmp_path, cuda))
    assert r.returncode == 0, r.stderr
    assert "GPU: NVIDIA H100 80GB HBM3, 81559 MiB, 550.54.15" in r.stdout and f"driver supports CUDA {cuda}" in r.stdout
    torch_line = next(line for line in r.stdout.splitlines()
                      if line.startswith("+ .venv/bin/python -m pip install torch"))
    want = "" if tag == "pypi" else f" --index-url https://download.pytorch.org/whl/{tag}"
    assert torch_line == "+ .venv/bin/python -m pip install torch" + want
    assert "no NVIDIA GPU" not in r.stdout + r.stderr


def test_rerun_skips_what_is_done(repo, tmp_path):
    """A .venv whose torch sees the GPU, the requirements stamp and a finished data prep: a real (not dry) run
    only runs the self-test. The venv's python is a stand-in that records what it is asked to do."""
    write_exe(repo / ".venv" / "bin" / "python", f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
case "$1" in
  -c) [[ $2 == *print* ]] && echo 2.13.0; exit 0 ;;
  -) script=$(cat); [[ $script == *estimate_mfu* ]] && echo "self-test ran at batch $2" &&
     echo "recommended: --batch $2 per GPU (with --accum N for a larger effective batch)"; exit 0 ;;
esac
exit 3
""")
    digest = subprocess.run(["sha256sum", str(repo / "requirements.txt")], capture_output=True, text=True)
    (repo / ".venv" / ".requirements.sha256").write_text(digest.stdout.split()[0] + "\n")
    os.makedirs(repo / "data" / "t2i")
    (repo / "data" / "t2i" / "index.json").write_text("{}")
    (repo / "data" / "t2i" / ".setup_gpu_limit").write_text("1000\n")

    r = run(repo, "--prep", "t2i", "500", "--batch", "256", path=fake_gpu(tmp_path, "12.4"))
    assert r.returncode == 0, r.stdout + r.stderr
    for words in ("skip: .venv exists", "skip: torch 2.13.0 already sees the GPU",
                  "skip: requirements.txt unchanged", "skip: data/t2i already holds a prep run of 1000 samples",
                  "self-test ran at batch 256"):
        assert words in r.stdout
    assert [line for line in r.stdout.splitlines() if line.startswith("+ ")] == \
        ["+ .venv/bin/python - 256  # stdin: the self-test above (bf16 matmul check, compiled bf16 seed-preset steps)"]
    # the next command: the card's, its batch of 1024 made of the self-test's 256 x 4 (GradCache: the same gradient)
    assert r.stdout.splitlines()[-3:] == [
        "(the self-test's batch is 256 on this GPU: --accum 4 keeps the card's batch of 1024)",
        "next: . .venv/bin/activate && python train.py --batch 256 --accum 4 --max_lr 3e-4",
        "      (the seed preset on data/t2i (1000 samples): train.py's defaults on CUDA once data/t2i is prepared)"]
    assert "pip" not in (tmp_path / "calls").read_text() and "prep_dataset" not in (tmp_path / "calls").read_text()

    # more data than was prepared, and a changed requirements.txt: those two steps run again
    with open(repo / "requirements.txt", "a") as f:
        f.write("# changed\n")
    r = run(repo, "--dry_run", "--prep", "t2i", "2000", path=fake_gpu(tmp_path, "12.4"))
    plan = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert "+ .venv/bin/python -m pip install -r requirements.txt" in plan
    assert "+ .venv/bin/python prep_dataset.py text-to-image-2m --out data/t2i --limit 2000" in plan


def test_old_python_is_refused(repo, tmp_path):
    write_exe(tmp_path / "py38", """#!/bin/sh
[ "$1" = "-V" ] && { echo "Python 3.8.10"; exit 0; }
exit 1
""")
    r = run(repo, "--dry_run", "--python", str(tmp_path / "py38"))
    assert r.returncode == 1 and "Python >= 3.9 needed" in r.stderr and "Python 3.8.10" in r.stderr


@pytest.mark.parametrize("args, words", [(["--prep", "foo", "5"], "unknown dataset 'foo'"),
                                         (["--prep", "t2i", "abc"], "N must be a positive integer, got 'abc'"),
                                         (["--prep", "t2i"], "--prep needs a dataset and a count"),
                                         (["--cuda", "12.4"], "--cuda needs a tag"),
                                         (["--batch", "0"], "--batch needs a positive integer or auto"),
                                         (["--bogus"], "unknown argument '--bogus'")])
def test_bad_arguments_exit_2(repo, args, words):
    r = run(repo, *args)
    assert r.returncode == 2 and words in r.stderr and "--help" in r.stderr


def bare_path(tmp_path, df_free_kb=None):
    """A PATH with only the tools the script runs, and no C compiler: a fresh box. With df_free_kb, a df that
    reports that much free space on /dev/shm (Docker's default is 64 MB)."""
    farm = tmp_path / "bare"
    farm.mkdir()
    for tool in ("bash", "cat", "dirname", "sha256sum", "cut", "df", "awk", "sed"):
        os.symlink(shutil.which(tool), farm / tool)
    write_exe(farm / "apt-get", "#!/bin/sh\nexit 9\n")  # present, as on Ubuntu; a dry run never calls it
    if df_free_kb is not None:
        os.unlink(farm / "df")
        write_exe(farm / "df", f"""#!/bin/sh
echo "Filesystem     1024-blocks  Used Available Capacity Mounted on"
echo "shm                  65536     0 {df_free_kb}        0% /dev/shm"
""")
    return str(farm)


def test_missing_compiler_and_python_headers_are_installed(repo, tmp_path):
    """Triton builds a C helper the first time torch.compile runs: without gcc/clang or Python.h, apt-get them."""
    write_exe(tmp_path / "py312", """#!/bin/sh
case "$*" in
  -V) echo "Python 3.12.1" ;;
  *Python.h*) exit 1 ;;
  *version_info*2*) echo 3.12 ;;
esac
exit 0
""")
    r = run(repo, "--dry_run", "--python", str(tmp_path / "py312"), path=bare_path(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no C compiler (gcc or clang) found" in r.stdout and "no Python.h for Python 3.12" in r.stdout
    plan = [line.replace("sudo ", "") for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert plan[:2] == ["+ apt-get update", "+ apt-get install -y build-essential python3.12-dev"]


def test_selftest_is_valid_python_using_this_repo_api():
    """The self-test needs a GPU to run; here: it parses, and it calls the model as train.py does (CLIPOutput)."""
    text = open(os.path.join(ROOT, "setup_gpu.sh")).read()
    code = text.split("SELFTEST_PY=$(cat <<'EOF'\n")[1].split("\nEOF\n")[0]
    compile(code, "selftest", "exec")
    assert "torch.compile(model)" in code and "outs.image" in code and "max_memory_allocated" in code


def test_cc_that_is_not_there_is_an_error(repo):
    r = subprocess.run(["bash", str(repo / "setup_gpu.sh"), "--dry_run"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": no_gpu_path(), "CC": "/no/such/cc"})
    assert r.returncode == 1 and "CC=/no/such/cc is not an executable" in r.stderr


def test_small_dev_shm_warns_with_the_fix(repo, tmp_path):
    r = run(repo, "--dry_run", path=bare_path(tmp_path, df_free_kb=65536) + os.pathsep + no_gpu_path())
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if "/dev/shm has only" in l)
    assert "64 MiB free" in line and "--ipc=host or --shm-size=16g" in r.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install -y shellcheck; .ci/run does)")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", os.path.join(ROOT, "setup_gpu.sh")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
