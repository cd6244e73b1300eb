"""dataloader.py's hub section on local `datasets` folders made here (never the network): open, columns, bytes."""
import io

import datasets
import pytest
from PIL import Image

from dataloader import decode_image, hub_columns, hub_image_bytes, open_hub_dataset, undecoded


def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The same two records as parquet under data/ (the hub's layout) and as save_to_disk."""
    root = tmp_path_factory.mktemp("hub")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"]),
                                  "caption": datasets.List(datasets.Value("string")), "n": datasets.Value("int32")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png("red"), "path": None}, {"bytes": png("blue"), "path": None}],
                                     "label": [0, 1], "caption": [["a red square", "red"], ["a blue square"]],
                                     "n": [7, 8]}, features=features)
    (root / "parquet" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "parquet" / "data" / "train-00000-of-00001.parquet"))
    ds.save_to_disk(str(root / "saved"))
    return root


@pytest.mark.parametrize("layout", ["parquet", "saved"])
def test_open_infer_and_read(hub, layout):
    ds, source = open_hub_dataset(str(hub / layout), "train")
    assert source["split"] == "train" and source["revision"].startswith("local-")
    cols = hub_columns(ds)  # the ClassLabel wins over the plain integer column "n"
    assert cols == {"image": "image", "caption": "caption", "label": "label", "classes": ["red", "blue"],
                    "captions_list": True}
    rows = list(undecoded(ds, cols["image"]))
    assert [r["caption"][0] for r in rows] == ["a red square", "a blue square"]
    assert [decode_image(hub_image_bytes(r["image"])).getpixel((0, 0)) for r in rows] == [(255, 0, 0), (0, 0, 255)]


def test_bad_columns_and_split_are_one_line(hub):
    ds, _ = open_hub_dataset(str(hub / "parquet"), "train")
    with pytest.raises(ValueError, match="'nope' is not a column"):
        hub_columns(ds, caption="nope")
    with pytest.raises(ValueError, match="'label' holds ClassLabel.*not images"):
        hub_columns(ds, image="label")
    with pytest.raises(ValueError, match="which column holds the caption. none"):
        hub_columns(ds.remove_columns("caption"), need=("image", "caption"))
    with pytest.raises(ValueError, match="Bad split|not in"):
        open_hub_dataset(str(hub / "parquet"), "validation")
    assert hub_image_bytes({"bytes": None, "path": "no/such/file.jpg"}) is None
