"""The augmentation policy (issue 15): the dataset says whether its captions describe layout (index.json), train.py
follows it unless told otherwise, crops are a pure function of (seed, epoch, position), and val/eval never crop."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import dataloader
import eval_zeroshot
import prep_dataset
import train
from dataloader import ShardLoader


def policy(index, *flags):
    return train.augment_policy(train.get_parser().parse_args(list(flags)), index)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two class folders of 32 px images through `prep_dataset.py folder`."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(src / c)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / c / f"{i}.png")
    prep_dataset.main(["folder", "--src", str(src), "--out", str(out), "--img_size", "32", "--vocab_size", "300",
                       "--val_frac", "0.2", "--workers", "1", "--quiet"])
    return str(out)


def read(path):
    with open(os.path.join(path, "index.json")) as f:
        return json.load(f)


def test_policy_round_trips_through_index_json(synth, folder):
    syn, real = read(synth), read(folder)
    assert syn["layout_in_captions"] is True and real["layout_in_captions"] is False
    assert policy(syn) == (False, "index.json: layout_in_captions=true")
    assert policy(real) == (True, "index.json: layout_in_captions=false")
    # an index.json from before the field: only the synthetic set (whose captions say where things are) stays off
    old = lambda index: {k: v for k, v in index.items() if k != "layout_in_captions"}
    assert policy(old(syn))[0] is False and policy(old(real))[0] is True


def test_explicit_flag_overrides_the_data_both_ways(synth, folder):
    assert policy(read(synth), "--augment") == (True, "--augment")
    assert policy(read(folder), "--no-augment") == (False, "--no-augment")


def test_bad_crop_flags_are_one_line_errors(capsys):
    for flags in (["--crop_area", "0.9", "0.5"], ["--crop_area", "0", "1"], ["--crop_ratio", "0", "1"]):
        parser = train.get_parser()
        with pytest.raises(SystemExit) as e:
            train.validate(parser, parser.parse_args(flags))
        assert e.value.code == 2 and "--crop_area" in capsys.readouterr().err


def spy_loaders(monkeypatch):
    made = []

    class Spy(ShardLoader):
        def __init__(self, data_dir, split="train", *a, **kw):
            made.append((split, kw.get("augment", False), kw.get("crop_area")))
            super().__init__(data_dir, split, *a, **kw)
    monkeypatch.setattr(train, "ShardLoader", Spy)
    return made


@pytest.mark.parametrize("flag, want", [(None, False), ("--augment", True)])
def test_train_follows_the_data_and_val_never_augments(synth, tmp_path, monkeypatch, capsys, flag, want):
    made = spy_loaders(monkeypatch)
    argv = ["--data", synth, "--preset", "micro", "--batch", "32", "--workers", "0", "--stop_at", "1",
            "--eval_every", "0", "--out", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs"), "--quiet",
            "--crop_area", "0.5", "0.9"] + ([flag] if flag else [])
    assert train.main(argv) == 0
    assert made == [("train", want, (0.5, 0.9)), ("val", False, None)]
    line = "random-resized-crop (area 0.5-0.9, aspect 0.75-1.33), from --augment" if flag else \
        "none, from index.json: layout_in_captions=true"
    assert f"augmentation: {line}" in capsys.readouterr().out


def test_start_line_says_which_and_why(folder, tmp_path, capsys):
    argv = ["--data", folder, "--preset", "micro", "--batch", "8", "--workers", "0", "--stop_at", "1",
            "--eval_every", "0", "--out", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs"), "--quiet"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "augmentation: random-resized-crop (area 0.35-1, aspect 0.75-1.33), from index.json: layout_in_captions=false" in out


def batches(root, n, **kw):
    loader = ShardLoader(root, "train", batch_size=16, seed=3, augment=True, crop_area=(0.3, 0.5), **kw)
    it = iter(loader)
    out = [next(it)["image"] for _ in range(n)]
    return out, loader


def test_crops_depend_on_seed_epoch_position_only_and_survive_a_resume(synth):
    full, _ = batches(synth, 3)
    again, _ = batches(synth, 3, num_workers=1)  # a worker process: the crop settings travel with it
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    plain = next(iter(ShardLoader(synth, "train", batch_size=16, seed=3)))["image"]
    assert not torch.equal(full[0], plain)  # the crop did something
    head, loader = batches(synth, 1)
    state = loader.state_dict()
    resumed = ShardLoader(synth, "train", batch_size=16, seed=0, augment=True, crop_area=(0.3, 0.5))
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert all(torch.equal(next(it)["image"], b) for b in full[1:])
    # by hand: the crop of one sample is a function of (seed, epoch, position) alone
    make = loader.make
    img = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    a, b = make.random_resized_crop(img, 0, 5), make.random_resized_crop(img, 0, 5)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(make.random_resized_crop(img, 1, 5)))


def test_eval_never_augments(synth, monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("eval cropped an image")
    monkeypatch.setattr(dataloader.BatchMaker, "random_resized_crop", boom)
    import clip
    tok = dataloader.load_tokenizer(os.path.join(synth, "tokenizer.json"))
    model = clip.CLIP(clip.get_config("micro", vocab_size=tok.vocab_size, img_size=32))
    r = eval_zeroshot.evaluate_checkpoint(model, tok, synth, split="val", quiet=True)
    assert 0 <= r["zeroshot_top1"] <= 1


def test_context_fits_the_longest_caption(synth, folder):
    """index.json's caption_tokens is the longest caption or swap negative (+ start/end); the text context shrinks to
    it (rounded up to 8) unless the flag, --long or a shorter preset says otherwise."""
    tok = dataloader.load_tokenizer(os.path.join(synth, "tokenizer.json"))
    texts = []
    for split in ("train", "val"):
        for shard in read(synth)[split]["shards"]:
            for files in dataloader.read_tar(os.path.join(synth, shard))[0].values():
                texts += [files["txt"].decode()] + json.loads(files["json"])["negatives"]
    assert read(synth)["caption_tokens"] == 2 + max(len(tok.encode(t)) for t in texts) <= 16
    folder_tok = dataloader.load_tokenizer(os.path.join(folder, "tokenizer.json"))
    assert read(folder)["caption_tokens"] == 2 + max(len(folder_tok.encode(f"a close-up photo of a {c}.")) for c in ("cat", "dog"))
    ctx = lambda *flags: train.build_config(train.get_parser().parse_args(["--preset", "micro", *flags]), read(synth),
                                            tok, 0)[0].text.context_length
    assert ctx() == 16 and ctx("--context_length", "24") == 24 and ctx("--long") == 32
    old = {k: v for k, v in read(synth).items() if k != "caption_tokens"}  # an index.json from before the field
    assert train.build_config(train.get_parser().parse_args(["--preset", "micro"]), old, tok, 0)[0].text.context_length == 32
