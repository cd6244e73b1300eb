"""train.py --zeroshot_data: zero-shot on another labelled set at every eval, with --data that has no classes (the
text-to-image-2M case), bit-exact across a resume; bad flags are one line."""

import json
import os
import shutil

import pytest
from PIL import Image

import train

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture(scope="module")
def sets(synth, tmp_path_factory):
    """The session's synthetic shards without their classes (a captions-only set), and colour class folders."""
    root = tmp_path_factory.mktemp("zs")
    shutil.copytree(synth, root / "captions")
    index = json.loads((root / "captions" / "index.json").read_text())
    del index["classes"]
    (root / "captions" / "index.json").write_text(json.dumps(index))
    for name, rgb in COLOURS.items():
        (root / "colours" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40 + i, 32), rgb).save(root / "colours" / name / f"{i}.png")
    return str(root / "captions"), str(root / "colours")


def argv(data, tmp, run, *extra):
    return ["--data", data, "--preset", "micro", "--batch", "32", "--epochs", "1", "--max_lr", "3e-3",
            "--workers", "0", "--eval_every", "5", "--ckpt_every", "5", "--out", str(tmp / "out"),
            "--log_dir", str(tmp / "logs"), "--run_name", run, "--quiet", *extra]


def val_records(tmp, run):
    with open(tmp / "logs" / run / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "val"]


def test_zeroshot_data_on_classless_shards_logs_every_eval_and_resumes_exactly(sets, tmp_path, capsys):
    captions, colours = sets
    zs = ["--zeroshot_data", colours, "--zeroshot_max_images", "9"]
    assert train.main(argv(captions, tmp_path, "full", *zs)) == 0  # 16 steps of 32: evals at 5, 10, 15, 16
    out = capsys.readouterr().out
    assert f"zero-shot on {colours}: top-1" in out and "(chance 33.3%)" in out
    assert "; zero-shot " in out.split("time:")[1]  # its share of the wall time
    full = val_records(tmp_path, "full")
    assert [r["step"] for r in full] == [5, 10, 15, 16]
    for r in full:
        assert set(r) >= {"loss", "zeroshot_data_top1", "zeroshot_data_top5"} and "zeroshot_top1" not in r
        assert 0 <= r["zeroshot_data_top1"] <= r["zeroshot_data_top5"] == 1.0  # 3 classes: top-5 is top-3
        assert r["zeroshot_data_top1"] * 9 == pytest.approx(round(r["zeroshot_data_top1"] * 9))  # of 9 images
    assert os.path.isfile(tmp_path / "logs" / "full" / "eval.png")
    assert train.main(argv(captions, tmp_path, "split", *zs, "--stop_at", "10")) == 0
    assert train.main(argv(captions, tmp_path, "split", *zs, "--resume", "latest")) == 0
    keep = ("step", "loss", "zeroshot_data_top1", "zeroshot_data_top5")
    assert [{k: r[k] for k in keep} for r in val_records(tmp_path, "split")] == [{k: r[k] for k in keep} for r in full]


@pytest.mark.parametrize("flags, message", [
    (["--zeroshot_data", "/no/such/dir"], "--zeroshot_data /no/such/dir is not a directory"),
    (["--zeroshot_data", "{captions}"], "no classes to classify"),
    (["--zeroshot_data", "{colours}", "--zeroshot_max_images", "0"], "--zeroshot_max_images must be >= 1"),
])
def test_bad_zeroshot_flags_are_one_line(sets, tmp_path, capsys, flags, message):
    captions, colours = sets
    flags = [f.replace("{captions}", captions).replace("{colours}", colours) for f in flags]
    with pytest.raises(SystemExit) as e:
        train.main(argv(captions, tmp_path, "bad", *flags))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
