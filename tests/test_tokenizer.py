import random
from collections import Counter

import pytest
import torch

from tokenizer import SPLIT, Tokenizer, clean, merge


def random_text(rng, n):
    """Random unicode (no surrogates): ASCII, accents, combining marks, CJK, emoji, newlines, any plane."""
    ranges = [(0x20, 0x7E), (0xC0, 0x17F), (0x300, 0x36F), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F),
              (0x0E00, 0x0E7F), (0x0600, 0x06FF)]
    chars = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            chars.append(rng.choice(" \n\t\r\u3000"))
        elif r < 0.15:  # any code point outside the surrogate block
            chars.append(chr(rng.choice([rng.randrange(0, 0xD800), rng.randrange(0xE000, 0x110000)])))
        else:
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def naive_train(texts, vocab_size):
    """Reference BPE: rescan every word for pair counts before each merge (slow, obviously right)."""
    counts = Counter(w for t in texts for w in SPLIT.findall(clean(t)))
    words = {tuple(w.encode("utf-8")): f for w, f in counts.items()}
    merges = []
    for _ in range(vocab_size - 258):
        stats = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                stats[p] += f
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))  # highest count, then smallest pair
        merges.append(pair)
        new_words = Counter()
        for w, f in words.items():
            new_words[tuple(merge(list(w), pair, 256 + len(merges) - 1))] += f
        words = new_words
    return merges


def test_merge_sequence_by_hand():
    # The Wikipedia BPE example: aa -> Z, then ab -> Y (ties with (Z, a) at 2; the smaller pair wins),
    # then ZY -> X, giving "XdXac".
    tok = Tokenizer().train("aaabdaaabac", vocab_size=256 + 3 + 2, quiet=True)
    assert list(tok.merges) == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert (tok.sot, tok.eot, tok.vocab_size) == (259, 260, 261)
    assert tok.tokenize("aaabdaaabac", context_length=8).tolist() == [[259, 258, 100, 258, 97, 99, 260, 0]]
    assert tok.decode([259, 258, 100, 258, 97, 99, 260]) == "aaabdaaabac"


def test_runs_out_of_pairs_and_bad_vocab_size():
    tok = Tokenizer().train(["ab ab"], vocab_size=1000, quiet=True)
    # words "ab" and " ab": merges (a,b) then (space, ab); then nothing is left to merge
    assert list(tok.merges) == [(97, 98), (32, 256)] and tok.vocab_size == 260 and tok.eot == 259
    for bad in (0, 257):
        with pytest.raises(ValueError, match="vocab_size"):
            Tokenizer().train(["abc"], vocab_size=bad)


def test_incremental_matches_naive():
    rng = random.Random(0)
    letters = "abcde "
    texts = ["".join(rng.choice(letters) for _ in range(rng.randint(5, 40))) for _ in range(200)]
    texts += ["the red cube", "The  RED cube!", "2024 cubes, 12 reds"]
    tok = Tokenizer().train(texts, vocab_size=258 + 120, quiet=True)
    assert list(tok.merges) == naive_train(texts, 258 + 120)
    assert len(tok.merges) == 120


def test_round_trip_random_unicode():
    rng = random.Random(1234)
    texts = [random_text(rng, rng.randint(0, 60)) for _ in range(200)]
    # train on part of the texts so merges span multi-byte UTF-8 sequences
    tok = Tokenizer().train(texts[:100] + ["héllo wörld 中文 😀😀 e\u0301"] * 5, vocab_size=400, quiet=True)
    assert len(tok.merges) == 400 - 258
    for t in texts + ["", "\n\n", "  a  b  ", "x\u0301\u0302", "👩‍👩‍👧‍👦"]:
        assert "".join(SPLIT.findall(t)) == t  # the split covers every character
        ids = tok.encode(t)
        assert all(0 <= i < tok.sot for i in ids)
        assert tok.decode(ids) == t
        assert tok.encode(t) == ids  # second call is served by the cache, same answer


def test_tokenize_shapes_padding_truncation_and_eot():
    tok = Tokenizer().train(["a red cube on a blue table"] * 3, vocab_size=300, quiet=True)
    out = tok.tokenize(["a red cube", "", "  A   Red  CUBE  "], context_length=16)
    assert out.shape == (3, 16) and out.dtype == torch.int64
    ids = tok.encode("a red cube")
    assert out[0, : len(ids) + 2].tolist() == [tok.sot] + ids + [tok.eot]
    assert out[0, len(ids) + 2 :].eq(0).all()
    assert out[1, :3].tolist() == [tok.sot, tok.eot, 0]
    assert torch.equal(out[2], out[0])  # clean() makes these the same caption
    assert tok.eot == tok.vocab_size - 1 and tok.sot == tok.vocab_size - 2
    assert out.argmax(-1).tolist() == [len(ids) + 1, 1, len(ids) + 1]  # argmax finds eot
    # too long: cut, sot first and eot kept as the last token
    long = " ".join(["zebra"] * 50)
    row = tok.tokenize(long, context_length=6)
    assert row.shape == (1, 6)
    assert row[0].tolist() == [tok.sot] + tok.encode(long)[:4] + [tok.eot]
    with pytest.raises(ValueError, match="context_length"):
        tok.tokenize("x", context_length=1)


def test_clean():
    assert clean("  A  Red\tCUBE\n\non  the   TABLE. ") == "a red cube on the table."
    assert clean("\n \t ") == ""
    assert clean("Ünïcode  ÉTÉ") == "ünïcode été"
    tok = Tokenizer()
    assert tok.encode("A  B") != tok.encode(clean("A  B"))  # encode itself does not clean


def test_save_load_and_dict_round_trip(tmp_path):
    rng = random.Random(5)
    texts = [random_text(rng, 40) for _ in range(50)] + ["a photo of a dog"] * 10
    tok = Tokenizer().train(texts, vocab_size=350, quiet=True)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]  # no temp file left over
    for other in (Tokenizer.load(path), Tokenizer.from_dict(tok.to_dict())):
        assert other.merges == tok.merges and other.vocab_size == tok.vocab_size
        for t in texts:
            assert other.encode(t) == tok.encode(t)
        assert torch.equal(other.tokenize(texts), tok.tokenize(texts))
    bad = tok.to_dict() | {"merges": [[300, 1]]}
    with pytest.raises(ValueError, match="bad merge"):
        Tokenizer.from_dict(bad)
    with pytest.raises(ValueError, match="version"):
        Tokenizer.from_dict(tok.to_dict() | {"version": 99})


def test_decode_rejects_out_of_range():
    tok = Tokenizer()
    assert tok.decode([tok.sot, 104, 105, tok.eot]) == "hi"
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character becomes U+FFFD
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
