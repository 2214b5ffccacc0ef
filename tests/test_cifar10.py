"""stages/lib/cifar10.py on synthetic data: both published layouts, packed and unpacked,
decode to the same arrays; damaged inputs give a PipelineError that names the problem."""
from __future__ import annotations

import itertools
import json
import pickle

import numpy as np
import pytest

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests import synthetic as syn
except ImportError:
    import synthetic as syn
from stages.lib import cifar10
from stages.lib.errors import PipelineError

LAYOUTS = ("npm-tarball", "python-tarball", "npm-dir", "python-dir")


@pytest.fixture
def ds(monkeypatch):
    dataset = syn.make_dataset(seed=0)
    syn.use_dataset(monkeypatch, dataset)
    return dataset


def decode(layout: str, tmp_path, ds, drop=(), replace=None):
    if layout == "npm-tarball":
        path = syn.make_npm_tarball(tmp_path / syn.NPM_TARBALL, ds, drop, replace)
        return cifar10.decode_archive(path, "npm")
    if layout == "python-tarball":
        path = syn.make_python_tarball(tmp_path / syn.TORONTO_TARBALL, ds, drop, replace)
        return cifar10.decode_archive(path, "python")
    if layout == "npm-dir":
        return cifar10.decode_directory(syn.make_npm_dir(tmp_path / "package", ds, drop, replace))
    if layout == "python-dir":
        return cifar10.decode_directory(syn.make_python_dir(tmp_path / "cifar-10-batches-py", ds, drop, replace))
    raise AssertionError(layout)


# --------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_decodes_to_the_original_arrays(layout, tmp_path, ds):
    splits = decode(layout, tmp_path, ds)
    assert set(splits) == {"test", "train"}
    for name in ("test", "train"):
        split = splits[name]
        assert split.images.dtype == np.uint8 and split.images.shape == (ds.sizes[name], 32, 32, 3)
        assert split.labels.dtype == np.int64 and split.labels.shape == (ds.sizes[name],)
        np.testing.assert_array_equal(split.images, ds.images[name])
        np.testing.assert_array_equal(split.labels, ds.labels[name])


@pytest.mark.parametrize("first,second", list(itertools.combinations(LAYOUTS, 2)))
def test_both_sources_decode_to_the_same_arrays(first, second, tmp_path, ds):
    a = decode(first, tmp_path / "a", ds)
    b = decode(second, tmp_path / "b", ds)
    for name in ("test", "train"):
        np.testing.assert_array_equal(a[name].images, b[name].images)
        np.testing.assert_array_equal(a[name].labels, b[name].labels)
        assert syn.array_sha256(a[name].images) == syn.array_sha256(b[name].images)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoded_arrays_pass_verify_with_their_digests(layout, tmp_path, ds):
    cifar10.verify(decode(layout, tmp_path, ds), "synthetic", syn.pinned_for(ds))


def test_pixel_layout_is_row_major_rgb(tmp_path, monkeypatch):
    """One marked pixel per channel: a transposed or channel-swapped decoder moves it."""
    ds = syn.make_dataset(seed=1)
    for name in ("test", "train"):
        ds.images[name][:] = 0
    ds.images["test"][3, 1, 2] = (200, 0, 0)   # R at row 1, column 2
    ds.images["test"][3, 5, 30] = (0, 100, 0)  # G
    ds.images["test"][4, 31, 0] = (0, 0, 50)   # B
    syn.use_dataset(monkeypatch, ds)
    for layout in ("npm-tarball", "python-tarball"):
        images = decode(layout, tmp_path / layout, ds)["test"].images
        assert images[3, 1, 2].tolist() == [200, 0, 0]
        assert images[3, 5, 30].tolist() == [0, 100, 0]
        assert images[4, 31, 0].tolist() == [0, 0, 50]
        assert int(images.astype(np.int64).sum()) == 350


# --------------------------------------------------------------------------- damaged inputs

@pytest.mark.parametrize("layout,member,full_name", [
    ("npm-tarball", "test_batch.png", "package/test_batch.png"),
    ("npm-tarball", "test_lables.json", "package/test_lables.json"),
    ("npm-tarball", "data_batch_3.png", "package/data_batch_3.png"),
    ("npm-tarball", "train_lables.json", "package/train_lables.json"),
    ("python-tarball", "test_batch", "cifar-10-batches-py/test_batch"),
    ("python-tarball", "data_batch_5", "cifar-10-batches-py/data_batch_5"),
])
def test_tarball_missing_member_names_it(layout, member, full_name, tmp_path, ds):
    with pytest.raises(PipelineError, match="missing") as info:
        decode(layout, tmp_path, ds, drop=[member])
    assert full_name in str(info.value)


@pytest.mark.parametrize("layout,member", [("npm-dir", "data_batch_2.png"), ("npm-dir", "train_lables.json"),
                                           ("python-dir", "data_batch_4")])
def test_directory_missing_file_names_it(layout, member, tmp_path, ds):
    with pytest.raises(PipelineError, match="not found") as info:
        decode(layout, tmp_path, ds, drop=[member])
    assert member in str(info.value)


def test_directory_of_neither_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(PipelineError) as info:
        cifar10.decode_directory(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "test_batch.png" in message and "test_batch " in message


def test_npm_png_of_wrong_width(tmp_path, ds):
    narrow = syn.png_rows(ds.images["test"], width=512)  # two rows an image
    with pytest.raises(PipelineError) as info:
        decode("npm-tarball", tmp_path, ds, replace={"test_batch.png": narrow})
    message = str(info.value)
    assert "test_batch.png" in message and "512" in message and "1024" in message


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_npm_png_not_rgb(mode, tmp_path, ds):
    other = syn.png_rows(ds.images["test"], mode=mode)
    with pytest.raises(PipelineError, match=mode) as info:
        decode("npm-dir", tmp_path, ds, replace={"test_batch.png": other})
    assert "expected RGB" in str(info.value)


def test_npm_png_unreadable(tmp_path, ds):
    with pytest.raises(PipelineError, match="not a readable PNG") as info:
        decode("npm-tarball", tmp_path, ds, replace={"data_batch_1.png": b"\x89PNG but not really"})
    assert "data_batch_1.png" in str(info.value)


@pytest.mark.parametrize("layout", ["npm-tarball", "npm-dir"])
def test_npm_wrong_number_of_images(layout, tmp_path, ds):
    short = syn.png_rows(ds.images["test"][:-1])
    with pytest.raises(PipelineError) as info:
        decode(layout, tmp_path, ds, replace={"test_batch.png": short})
    message = str(info.value)
    assert "expected uint8(20, 32, 32, 3)" in message and "(19, 32, 32, 3)" in message and "test" in message


@pytest.mark.parametrize("layout", ["python-tarball", "python-dir"])
def test_python_wrong_number_of_images(layout, tmp_path, ds):
    part = syn.batch_slices(50)[1]
    short = syn.python_batch(ds.images["train"][part][:-1], ds.labels["train"][part][:-1])
    with pytest.raises(PipelineError) as info:
        decode(layout, tmp_path, ds, replace={"data_batch_2": short})
    message = str(info.value)
    assert "expected uint8(50, 32, 32, 3)" in message and "(49, 32, 32, 3)" in message and "train" in message


def test_npm_wrong_number_of_labels(tmp_path, ds):
    labels = json.dumps(ds.labels["test"][:-2].tolist()).encode()
    with pytest.raises(PipelineError, match=r"expected \(20,\)") as info:
        decode("npm-tarball", tmp_path, ds, replace={"test_lables.json": labels})
    assert "(18,)" in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b'{"a": 1}'])
def test_npm_labels_not_a_json_list(content, tmp_path, ds):
    with pytest.raises(PipelineError, match="not a JSON list of labels") as info:
        decode("npm-tarball", tmp_path, ds, replace={"train_lables.json": content})
    assert "train_lables.json" in str(info.value)


@pytest.mark.parametrize("content", [b"not a pickle", pickle.dumps({b"labels": [1, 2]})])
def test_python_batch_not_a_batch(content, tmp_path, ds):
    with pytest.raises(PipelineError, match="not a CIFAR-10 python batch") as info:
        decode("python-tarball", tmp_path, ds, replace={"test_batch": content})
    assert "test_batch" in str(info.value)


def test_python_batch_rows_of_wrong_width(tmp_path, ds):
    bad = pickle.dumps({b"data": np.zeros((20, 3000), np.uint8), b"labels": [0] * 20})
    with pytest.raises(PipelineError, match=r"expected \(N, 3072\)") as info:
        decode("python-dir", tmp_path, ds, replace={"test_batch": bad})
    assert "(20, 3000)" in str(info.value)


def test_archive_not_a_tarball(tmp_path):
    path = tmp_path / syn.NPM_TARBALL
    path.write_bytes(b"this is not gzip")
    with pytest.raises(PipelineError, match="not a readable tar archive") as info:
        cifar10.decode_archive(path, "npm")
    assert str(path) in str(info.value)


def test_npm_tarball_with_python_layout_is_refused(tmp_path, ds):
    path = syn.make_python_tarball(tmp_path / "x.tgz", ds)
    with pytest.raises(PipelineError, match="package/test_batch.png is missing"):
        cifar10.decode_archive(path, "npm")


# --------------------------------------------------------------------------- verify

@pytest.mark.parametrize("split,part", [("test", "images"), ("test", "labels"),
                                        ("train", "images"), ("train", "labels")])
def test_verify_wrong_digest_names_expected_and_actual(split, part, tmp_path, ds):
    splits = decode("npm-dir", tmp_path, ds)
    pinned = syn.pinned_for(ds)
    actual = pinned[split][part]
    wrong = "0" * 64
    pinned[split][part] = wrong
    with pytest.raises(PipelineError) as info:
        cifar10.verify(splits, "origin-x", pinned)
    message = str(info.value)
    assert actual in message and wrong in message
    assert f"{split} {part}" in message and "origin-x" in message


def test_verify_detects_a_single_changed_pixel(tmp_path, ds):
    splits = decode("python-dir", tmp_path, ds)
    splits["train"].images[7, 3, 4, 1] ^= 1
    with pytest.raises(PipelineError, match="train images"):
        cifar10.verify(splits, "x", syn.pinned_for(ds))


def test_verify_by_default_uses_the_pinned_real_digests(tmp_path):
    """Without use_dataset: synthetic data must not pass for the real CIFAR-10."""
    ds = syn.make_dataset(seed=0)
    splits = {name: cifar10.Split(ds.images[name], ds.labels[name]) for name in ("test", "train")}
    with pytest.raises(PipelineError) as info:
        cifar10.verify(splits, "synthetic")
    assert cifar10.PINNED["test"]["images"] in str(info.value)


# --------------------------------------------------------------------------- save / load

def test_save_load_roundtrip(tmp_path, ds):
    splits = {name: cifar10.Split(ds.images[name], ds.labels[name]) for name in ("test", "train")}
    cifar10.save(splits, tmp_path)
    assert syn.listing(tmp_path) == ["test_images.npy", "test_labels.npy",
                                     "train_images.npy", "train_labels.npy"]
    for name in ("test", "train"):
        loaded = cifar10.load(tmp_path, name)
        assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int64
        np.testing.assert_array_equal(loaded.images, ds.images[name])
        np.testing.assert_array_equal(loaded.labels, ds.labels[name])


@pytest.mark.parametrize("limit,expected", [(None, 20), (1, 1), (7, 7), (20, 20), (1000, 20)])
def test_load_limit_takes_the_first_samples(limit, expected, tmp_path, ds):
    syn.write_prepared(tmp_path, ds)
    loaded = cifar10.load(str(tmp_path), "test", limit=limit)
    assert loaded.images.shape == (expected, 32, 32, 3) and loaded.labels.shape == (expected,)
    np.testing.assert_array_equal(loaded.images, ds.images["test"][:expected])
    np.testing.assert_array_equal(loaded.labels, ds.labels["test"][:expected])


@pytest.mark.parametrize("missing", ["train_images.npy", "train_labels.npy"])
def test_load_missing_file(missing, tmp_path, ds):
    syn.write_prepared(tmp_path, ds)
    (tmp_path / missing).unlink()
    with pytest.raises(PipelineError, match="fetch_cifar10") as info:
        cifar10.load(tmp_path, "train")
    assert missing in str(info.value)
