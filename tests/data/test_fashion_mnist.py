"""Fashion-MNIST from the official files: counts, checksums, and clear failures."""
from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from tensorslim.data import fashion_mnist as fm
from tensorslim.data import DataIntegrityError, load_fashion_mnist, parse_idx

SYSTEM = fm.SYSTEM_DIR
needs_data = pytest.mark.skipif(
    not (SYSTEM / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fm.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def train_split() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist("train")


@needs_data
def test_train_split_counts(train_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = train_split
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10


@needs_data
def test_test_split_counts() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    # first test image is an ankle boot (class 9) in the official release
    assert int(labels[0]) == 9


@needs_data
def test_normalisation_constants(train_split: tuple[torch.Tensor, torch.Tensor]) -> None:
    x = train_split[0].double() / 255
    assert abs(x.mean().item() - fm.MEAN) < 1e-4
    assert abs(x.std().item() - fm.STD) < 1e-4


@needs_data
@pytest.mark.parametrize("stem", sorted(fm.MD5_RAW))
def test_system_files_match_official_checksums(stem: str) -> None:
    raw = gzip.decompress((SYSTEM / f"{stem}.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == fm.MD5_RAW[stem]


def test_gz_checksums_are_upstream_values() -> None:
    # upstream README of zalandoresearch/fashion-mnist
    assert fm.MD5_GZ["train-images-idx3-ubyte"] == "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    assert fm.MD5_GZ["t10k-labels-idx1-ubyte"] == "bb300cfdad3c16e7a12a480ee83cd310"


def _copy_test_split(dst: Path, *, gz: bool) -> None:
    for stem in fm.SPLITS["test"]:
        src = SYSTEM / f"{stem}.gz"
        if gz:
            shutil.copy(src, dst / f"{stem}.gz")
        else:
            (dst / stem).write_bytes(gzip.decompress(src.read_bytes()))


@needs_data
def test_uncompressed_files_in_root(tmp_path: Path) -> None:
    _copy_test_split(tmp_path, gz=False)
    images, labels = load_fashion_mnist("test", root=tmp_path)
    ref_images, ref_labels = load_fashion_mnist("test")
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


@needs_data
def test_env_var_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _copy_test_split(tmp_path, gz=True)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert load_fashion_mnist("test")[1].shape == (10000,)


@needs_data
def test_truncated_gz_is_a_clear_error(tmp_path: Path) -> None:
    _copy_test_split(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(DataIntegrityError, match="t10k-images-idx3-ubyte.gz.*(gzip|truncated)"):
        load_fashion_mnist("test", root=tmp_path)


@needs_data
def test_truncated_idx_is_a_clear_error(tmp_path: Path) -> None:
    _copy_test_split(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataIntegrityError, match=r"shape \(10000,\) = 10008 bytes, file has 5000"):
        load_fashion_mnist("test", root=tmp_path)


@needs_data
def test_altered_content_fails_checksum(tmp_path: Path) -> None:
    _copy_test_split(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[100] = (data[100] + 1) % 10
    path.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match="MD5.*15d484375f8d13e6eb1aabb0c3f46965"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_files_error_lists_every_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", root=tmp_path / "root")
    msg = str(info.value)
    for d in ("root", "env", "system"):
        assert str(tmp_path / d / "train-images-idx3-ubyte") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert fm.ENV_VAR in msg and "download=True" in msg


def test_parse_idx_rejects_bad_headers() -> None:
    with pytest.raises(DataIntegrityError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x01" + b"\x00\x00\x00\x01" + b"\x00")
    with pytest.raises(DataIntegrityError, match="too short"):
        parse_idx(b"\x00\x00")
    ok = parse_idx(b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6)))
    assert ok.shape == (2, 3) and ok[1, 2].item() == 5


def test_bad_split_name() -> None:
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation")


class _FakeResponse:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __enter__(self) -> "_FakeResponse":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> bytes:
        return self.payload


def test_download_rejects_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"junk"))
    with pytest.raises(OSError, match="MD5"):
        fm.download_file("t10k-labels-idx1-ubyte", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written half-way


@needs_data
def test_download_writes_verified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[str] = []

    def urlopen(url: str, timeout: float) -> _FakeResponse:
        served.append(url)
        return _FakeResponse((SYSTEM / url.rsplit("/", 1)[1]).read_bytes())

    # the Debian .gz files differ from upstream's only in their gzip header; accept their MD5
    debian = {s: hashlib.md5((SYSTEM / f"{s}.gz").read_bytes()).hexdigest() for s in fm.MD5_GZ}
    monkeypatch.setattr(fm, "MD5_GZ", debian)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setattr(fm.urllib.request, "urlopen", urlopen)
    images, labels = load_fashion_mnist("test", root=tmp_path, download=True)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert served[0].startswith(fm.MIRRORS[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
