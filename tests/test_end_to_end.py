"""The whole path a user takes: synthetic data -> train.py -> checkpoint -> eval_zeroshot.py, on a CPU."""
import json
import os
import subprocess
import sys

import prep_dataset
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_few_hundred_steps_beat_chance_by_a_wide_margin(tmp_path):
    data = str(tmp_path / "data")
    prep_dataset.main(["synthetic", "--out", data, "--num_train", "3000", "--num_val", "320", "--img_size", "32",
                       "--workers", "1", "--quiet"])
    assert train.main(["--data", data, "--preset", "micro", "--batch", "64", "--epochs", "6", "--max_lr", "5e-3",
                       "--warmup_frac", "0.05", "--workers", "1", "--eval_every", "0", "--out", str(tmp_path / "out"),
                       "--log_dir", str(tmp_path / "logs"), "--run_name", "e2e", "--quiet"]) == 0
    with open(tmp_path / "logs" / "e2e" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train_steps = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"][-1]
    assert len(train_steps) == 6 * (3000 // 64)  # 6 epochs of 46 full batches
    chance = 1 / 64  # 8 colours x 8 shapes
    assert val["zeroshot_top1"] > 6 * chance, val
    assert val["i2t_R@1"] > 10 / 320 and val["t2i_R@1"] > 10 / 320, val  # 10x chance over 320 val pairs
    assert val["loss"] < train_steps[0]["loss"] - 1.0

    # the checkpoint alone is enough to evaluate: the CLI gives the same zero-shot accuracy
    out = tmp_path / "results.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "eval_zeroshot.py"), "--ckpt",
                    str(tmp_path / "out" / "e2e" / "ckpt" / "latest.pt"), "--data", data, "--out", str(out),
                    "--quiet"], check=True, cwd=ROOT, capture_output=True)
    results = json.loads(out.read_text())
    assert abs(results["zeroshot_top1"] - val["zeroshot_top1"]) < 1e-9
    for png in ("loss.png", "lr.png", "grad_norm.png", "logit_scale.png"):
        assert (tmp_path / "logs" / "e2e" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
