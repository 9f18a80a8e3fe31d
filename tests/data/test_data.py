"""Tests for unitok.data: procedural shapes, Fashion-MNIST, folder and webdataset sources, helpers. CPU, seconds."""
import gzip
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok.data import files as data
from unitok.data.datasets import DATASETS, build_dataset
from unitok.data.files import FashionMNIST, FolderDataset, WebDataset
from unitok.data.images import make_grid_image, to_uint8_image
from unitok.data.shapes_dataset import ShapesDataset
from PIL import Image

# ---------------------------------------------------------------------------------------------------------------
# ShapesDataset


def test_determinism_and_streams():
    a, b = ShapesDataset(32, seed=0), ShapesDataset(32, seed=0)
    for i in (0, 7, 49_999):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["labels"] == y["labels"]
    other_seed = ShapesDataset(32, seed=1)
    assert any(not torch.equal(a[i]["image"], other_seed[i]["image"]) for i in range(5))
    test = ShapesDataset(32, split="test")
    assert all(not torch.equal(a[i]["image"], test[i]["image"]) for i in range(20))
    assert torch.equal(a[-1]["image"], a[len(a) - 1]["image"])


def test_scene_is_independent_of_image_size():
    small, big = ShapesDataset(32), ShapesDataset(128)
    for i in range(10):
        assert small[i]["caption"] == big[i]["caption"] and small[i]["labels"] == big[i]["labels"]


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
def test_shapes_range_and_shape(size):
    ds = ShapesDataset(size, length=6)
    for item in ds:  # also checks that iteration stops (IndexError at the end)
        image = item["image"]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert image.std() > 0.05  # something was drawn
        assert set(item["labels"]) == {"shape", "colour", "size", "position", "background", "num_objects",
                                       "colour_shape"}


def test_every_attribute_value_appears():
    ds = ShapesDataset(32, length=400)
    labels = [ds[i]["labels"] for i in range(len(ds))]
    expected = {"shape": ds.SHAPES, "colour": ds.COLOURS, "size": ds.SIZES, "position": ds.POSITIONS,
                "background": ds.BACKGROUNDS}
    for key, names in expected.items():
        assert set(l[key] for l in labels) == set(range(len(names))), key
    assert set(l["num_objects"] for l in labels) == {1, 2}
    assert len(set(l["colour_shape"] for l in labels)) > 40


def test_heldout_pairs_definition():
    heldout = set(ShapesDataset.heldout_pairs)
    pairs = [(c, s) for c in ShapesDataset.COLOURS for s in ShapesDataset.SHAPES]
    assert len(ShapesDataset.SHAPES) >= 6 and len(ShapesDataset.COLOURS) == 8 and len(pairs) >= 48
    assert heldout <= set(pairs) and len(heldout) == len(ShapesDataset.heldout_pairs)
    assert 0.12 <= len(heldout) / len(pairs) <= 0.2  # about 1/6
    train = [p for p in pairs if p not in heldout]
    assert min(Counter(c for c, _ in train).values()) >= 6  # every colour keeps training partners
    assert min(Counter(s for _, s in train).values()) >= 6  # every shape too


@pytest.mark.parametrize("split", ["train", "test"])
def test_heldout_pairs_never_in_train_or_test(split):
    ds = ShapesDataset(32, split=split, length=2000)
    heldout = set(ds.heldout_pairs)
    seen = set()
    for i in range(len(ds)):
        for obj in ds.scene(i)["objects"]:  # primary and secondary objects
            seen.add((obj["colour"], obj["shape"]))
    assert not seen & heldout
    assert len(seen) == 64 - len(heldout)  # and every other pair does appear


def test_heldout_split_has_only_heldout_primaries():
    ds = ShapesDataset(32, split="heldout", length=300)
    heldout = set(ds.heldout_pairs)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        colour, shape = ds.COLOURS[item["labels"]["colour"]], ds.SHAPES[item["labels"]["shape"]]
        assert (colour, shape) in heldout and item["labels"]["num_objects"] == 1
        assert f"{colour} {shape}" in item["caption"] or f"{colour} " not in item["caption"]
        assert shape in item["caption"]
        seen.add((colour, shape))
    assert seen == heldout
    two = ShapesDataset(32, split="heldout", length=200, max_objects=2)
    assert any(two[i]["labels"]["num_objects"] == 2 for i in range(len(two)))
    assert all((o["colour"], o["shape"]) in heldout for o in [two.scene(i)["objects"][0] for i in range(200)])


def test_max_objects_one():
    ds = ShapesDataset(32, split="test", max_objects=1, length=200)
    assert all(ds[i]["labels"]["num_objects"] == 1 for i in range(len(ds)))


def test_captions_match_labels():
    ds = ShapesDataset(32, length=300)
    words = set(ds.COLOURS) | set(ds.SHAPES)
    for i in range(len(ds)):
        item, scene = ds[i], ds.scene(i)
        l, caption = item["labels"], item["caption"]
        primary = f"{ds.COLOURS[l['colour']]} {ds.SHAPES[l['shape']]}"
        assert ds.COLOUR_SHAPES[l["colour_shape"]] == primary
        # half of the captions leave every colour out (P_NO_COLOUR); the others name each object's colour + shape
        coloured = primary in caption
        for obj in scene["objects"]:
            assert (f"{obj['colour']} {obj['shape']}" if coloured else obj["shape"]) in caption, caption
        background = ds.BACKGROUNDS[l["background"]]
        objects_part = caption.replace(f"{background} background", "").replace(f"over {background}", "")
        objects_part = objects_part.replace(f"on {background}", "").replace(f"against {background}", "")
        mentioned = {w for w in objects_part.replace(",", " ").replace(":", " ").split() if w in words}
        named = {w for o in scene["objects"] for w in ((o["colour"], o["shape"]) if coloured else (o["shape"],))}
        assert mentioned == named, caption
        if ds.SIZES[l["size"]] == "large":
            assert "small " + primary not in caption
        assert not {o["colour"] for o in scene["objects"]} & ds.CLASHES.get(background, set())
        if " over " in caption or "background" in caption:
            assert background in caption


def test_zero_shot_tasks():
    tasks = ShapesDataset.zero_shot_tasks()
    assert {"shape", "colour", "colour_shape"} <= set(tasks)
    item = ShapesDataset(32)[0]
    for name, (classnames, templates, key) in tasks.items():
        assert key in item["labels"] and 6 <= len(templates) <= 10
        assert all("{}" in t for t in templates)
        assert len(classnames) == len(set(classnames)) and item["labels"][key] < len(classnames)
    assert "triangle" in tasks["shape"][0] and "red triangle" in tasks["colour_shape"][0]
    assert tasks["colour"][0] == list(ShapesDataset.COLOURS)


def test_default_collate_batches_items():
    loader = torch.utils.data.DataLoader(ShapesDataset(32, length=8), batch_size=4)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert batch["labels"]["colour_shape"].shape == (4,)


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(32, split="val")
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(32.0)
    with pytest.raises(ValueError, match="image_size"):
        ShapesDataset(8)
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(32, length=0)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesDataset(32, max_objects=3)
    with pytest.raises(IndexError):
        ShapesDataset(32, length=5)[5]
    assert len(ShapesDataset()) == 50_000 and len(ShapesDataset(split="test")) == 2_000


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.mark.skipif(not data.FASHION_MNIST_DEBIAN_DIR.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed (/usr/share/datasets/fashion-mnist)")
def test_fashion_mnist_from_debian_files():
    train, test = FashionMNIST(32, "train"), FashionMNIST(48, "test")
    assert len(train) == 60_000 and len(test) == 10_000
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].std() > 0.1
    assert torch.equal(item["image"][0], item["image"][2])  # grey copied to RGB
    name = FashionMNIST.CLASSES[item["labels"]["class"]]
    assert name in item["caption"]
    assert test[5]["image"].shape == (3, 48, 48)
    assert Counter(int(t) for t in test.targets) == {c: 1000 for c in range(10)}
    native = FashionMNIST(28, "test")[3]["image"]  # no resize at 28: the exact pixels
    assert torch.allclose((native[0] + 1) * 127.5, test.images[3].float(), atol=1e-3)


def test_fashion_mnist_reads_idx_from_root(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 7, 9, 3]))  # not gzipped: also accepted
    ds = FashionMNIST(32, "test", root=tmp_path)
    assert len(ds) == 5 and ds[2]["labels"] == {"class": 7} and "sneaker" in ds[2]["caption"]
    assert ds[4]["image"].shape == (3, 32, 32)
    tasks = FashionMNIST.zero_shot_tasks()
    assert tasks["class"][0] == list(FashionMNIST.CLASSES) and tasks["class"][2] == "class"
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(32, "val", root=tmp_path)


def test_fashion_mnist_clear_error_without_files_or_network(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setenv("UNITOK_DATA_CACHE", str(tmp_path / "cache"))

    class NoNetwork:
        class datasets:
            @staticmethod
            def FashionMNIST(*args, **kwargs):
                raise OSError("no network")

    monkeypatch.setitem(sys.modules, "torchvision", NoNetwork)
    with pytest.raises(RuntimeError, match="dataset-fashion-mnist"):
        FashionMNIST(32, "train")


# ---------------------------------------------------------------------------------------------------------------
# FolderDataset


def _picture(path: Path, size=(40, 24), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path):
    _picture(tmp_path / "red.png")
    _picture(tmp_path / "green.jpg", (24, 40), (30, 200, 30))
    (tmp_path / "sub").mkdir()
    _picture(tmp_path / "sub" / "blue.png", (32, 32), (30, 30, 200))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return tmp_path


ROWS = [("red.png", "a red thing"), ("green.jpg", "a green thing"), ("corrupt.png", "broken"),
        ("missing.png", "not there"), ("sub/blue.png", "a blue thing")]


def _check_folder_dataset(ds, root):
    assert len(ds) == 3 and len(ds.skipped) == 2
    reasons = dict(ds.skipped)
    assert reasons[str(root / "missing.png")] == "missing file"
    assert reasons[str(root / "corrupt.png")].startswith("unreadable image")
    assert [ds[i]["caption"] for i in range(3)] == ["a red thing", "a green thing", "a blue thing"]
    for i, channel in enumerate([0, 1, 2]):
        image = ds[i]["image"]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert image.mean(dim=(1, 2)).argmax() == channel  # the right picture, in RGB order
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["labels"] == {}


def test_folder_csv_skips_bad_images(image_folder):
    ann = image_folder / "captions.csv"
    ann.write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, c in ROWS))
    with pytest.warns(UserWarning, match="skipped 2 of 5"):
        ds = FolderDataset(ann, image_size=16)
    _check_folder_dataset(ds, image_folder)


def test_folder_jsonl_skips_bad_images_and_absolute_paths(image_folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("annotations")
    rows = [{"image": str(image_folder / p), "caption": c} for p, c in ROWS]
    (elsewhere / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with pytest.warns(UserWarning, match="skipped 2"):
        ds = FolderDataset(elsewhere / "data.jsonl", image_size=16)
    _check_folder_dataset(ds, image_folder)
    # relative paths resolved against root= instead of the annotation's folder
    (elsewhere / "rel.jsonl").write_text("\n".join(json.dumps({"image": p, "caption": c}) for p, c in ROWS))
    with pytest.warns(UserWarning):
        assert len(FolderDataset(elsewhere / "rel.jsonl", 16, root=image_folder)) == 3


def test_folder_survives_a_file_broken_after_construction(image_folder):
    ann = image_folder / "captions.csv"
    ann.write_text("image,caption\nred.png,a red thing\ngreen.jpg,a green thing\n")
    ds = FolderDataset(ann, image_size=16)
    (image_folder / "red.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="could not decode"):
        item = ds[0]
    assert item["caption"] == "a green thing" and ds.skipped[0][0] == str(image_folder / "red.png")
    assert ds[0]["caption"] == "a green thing"  # remembered: no second failure


def test_folder_without_annotation_file(tmp_path):
    _picture(tmp_path / "red_car.png")
    _picture(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a caption from a text file\n")
    ds = FolderDataset(tmp_path, image_size=16)
    assert [ds[i]["caption"] for i in range(2)] == ["a caption from a text file", "red car"]


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no readable images"):
        FolderDataset(tmp_path)  # empty folder
    ann = tmp_path / "bad.csv"
    ann.write_text("file,text\na.png,hello\n")
    with pytest.raises(ValueError, match="columns 'image' and 'caption'"):
        FolderDataset(ann)
    ann.write_text("image,caption\nnope.png,hello\n")
    with pytest.raises(ValueError, match="no readable images.*missing file"):
        FolderDataset(ann)
    with pytest.raises(ValueError, match="does not exist"):
        FolderDataset(tmp_path / "absent.csv")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        FolderDataset(tmp_path / "notes.txt")


# ---------------------------------------------------------------------------------------------------------------
# WebDataset


def _write_shard(path: Path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _png(colour, size=(20, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_tiny_shard(tmp_path):
    pytest.importorskip("webdataset")
    samples = [("s0.png", _png((255, 0, 0))), ("s0.txt", b"a red square"),
               ("s1.png", _png((0, 255, 0))), ("s1.txt", b"a green square\n"),
               ("s2.png", _png((0, 0, 255))), ("s2.txt", "a blue square".encode())]
    _write_shard(tmp_path / "shard-000.tar", samples)
    _write_shard(tmp_path / "shard-001.tar", [("s3.png", b"not a png"), ("s3.txt", b"broken"),
                                              ("s4.png", _png((9, 9, 9)))])  # corrupt image; no caption
    ds = WebDataset(str(tmp_path / "shard-000.tar"), image_size=16)
    items = list(ds)
    assert [i["caption"] for i in items] == ["a red square", "a green square", "a blue square"]
    assert all(i["image"].shape == (3, 16, 16) and i["labels"] == {} for i in items)
    assert [int(i["image"].mean(dim=(1, 2)).argmax()) for i in items] == [0, 1, 2]
    with pytest.warns(UserWarning):
        both = list(build_dataset("webdataset", 16, path=tmp_path, shuffle=10))  # a folder of shards
    assert sorted(i["caption"] for i in both) == sorted(i["caption"] for i in items)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16)


def test_webdataset_bad_arguments(tmp_path):
    pytest.importorskip("webdataset")
    with pytest.raises(ValueError, match="found none"):
        WebDataset(tmp_path)
    with pytest.raises(ValueError, match="non-empty list"):
        WebDataset([])
    with pytest.raises(ValueError, match="shuffle"):
        WebDataset("x.tar", shuffle=-1)


def test_webdataset_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # makes `import webdataset` raise ImportError
    with pytest.raises(ImportError, match=r"pip install unitok\[webdataset\]"):
        WebDataset("x.tar")


# ---------------------------------------------------------------------------------------------------------------
# build_dataset and helpers


def test_build_dataset(tmp_path):
    assert DATASETS == ("shapes", "fashion-mnist", "folder", "webdataset")
    ds = build_dataset("shapes", 32, split="heldout", length=10)
    assert isinstance(ds, ShapesDataset) and ds.split == "heldout" and len(ds) == 10
    with pytest.raises(ValueError, match="fashion-mnist.*folder.*webdataset"):
        build_dataset("imagenet", 32)
    with pytest.raises(ValueError, match="path"):
        build_dataset("folder", 32)
    with pytest.raises(ValueError, match="path"):
        build_dataset("webdataset", 32)
    with pytest.raises(ValueError, match="no readable images"):
        build_dataset("folder", 32, path=tmp_path)


def test_to_uint8_and_grid():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4).expand(3, 1, 4)
    img = to_uint8_image(x)
    assert img.shape == (1, 4, 3) and img.dtype == np.uint8
    assert img[0, :, 0].tolist() == [0, 128, 255, 255]
    batch = torch.zeros(5, 3, 8, 6)
    assert to_uint8_image(batch).shape == (5, 8, 6, 3)
    grid = make_grid_image(batch, nrow=2, padding=1)
    assert grid.shape == (3 * 9 + 1, 2 * 7 + 1, 3) and grid.dtype == np.uint8
    assert make_grid_image([batch[0], batch[1]], nrow=8).shape == (12, 2 * 8 + 2, 3)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_uint8_image(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="empty"):
        make_grid_image([])
