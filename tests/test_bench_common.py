"""bench/common.py's results writer: a regenerated table replaces the old one, a hand-written reading below it stays."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # after the root: bench/tokenizer.py must not shadow tokenizer.py
import common  # noqa: E402


def test_a_regenerated_table_keeps_the_reading_below_it(tmp_path):
    md = tmp_path / "results" / "x.md"
    common.write_text(md, "# X\n\n| a |\n|---|\n| 1 |\n")  # a new file: the text as given
    assert md.read_text() == "# X\n\n| a |\n|---|\n| 1 |\n"
    reading = "<!-- reading: by hand -->\n## Reading\nThe 1 means ...\n"
    md.write_text(md.read_text() + "\n" + reading)
    common.write_text(md, "# X\n\n| a |\n|---|\n| 2 |")
    assert md.read_text() == "# X\n\n| a |\n|---|\n| 2 |\n\n" + reading
    common.write_text(md, "# X\n\n| a |\n|---|\n| 3 |\n")  # and again: one reading, not two
    assert md.read_text() == "# X\n\n| a |\n|---|\n| 3 |\n\n" + reading


def test_a_marker_inside_a_line_is_not_a_reading(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("table mentions <!-- reading: here --> inline\n")
    common.write_text(md, "new\n")
    assert md.read_text() == "new\n"
