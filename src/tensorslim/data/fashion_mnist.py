"""Fashion-MNIST from its official IDX files (Xiao, Rasul & Vollgraf 2017).

Where the files are looked for, in order: the ``root`` argument, ``$TENSORSLIM_DATA``,
``/usr/share/datasets/fashion-mnist`` (Debian/Ubuntu package ``dataset-fashion-mnist``).
Each file may be gzipped (``*.gz``) or not.

Integrity: every file is checked against the MD5 of its *uncompressed* IDX payload, which
is what identifies the data. The MD5 of the ``.gz`` container (the one in the upstream
README) is checked on download only, because repackaging rewrites gzip headers without
touching the data: Debian's build normalises them (file name dropped, mtime reset), so the
installed ``.gz`` files have other MD5s than upstream's while their contents are
byte-identical.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path

import torch

ENV_VAR = "TENSORSLIM_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Pixel statistics of the 60,000 training images scaled to [0, 1] (checked in the tests).
MEAN = 0.2860
STD = 0.3530

SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
# MD5 of the gzipped files as published upstream (README of zalandoresearch/fashion-mnist).
MD5_GZ: dict[str, str] = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# MD5 of the uncompressed IDX files (identical for the upstream and the Debian files).
MD5_RAW: dict[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
MIRRORS: tuple[str, ...] = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_IDX_DTYPE_UBYTE = 0x08


class DataIntegrityError(ValueError):
    """A data file exists but is truncated, corrupt or not the official release."""


def candidate_dirs(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The directories searched for the files, in order of preference."""
    dirs: list[Path] = []
    if root is not None:
        dirs.append(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(SYSTEM_DIR)
    return dirs


def _find_file(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _missing_message(stem: str, dirs: list[Path]) -> str:
    looked = "\n".join(f"  {d / stem}[.gz]" for d in dirs)
    return (
        f"Fashion-MNIST file {stem!r} not found. Looked in:\n{looked}\n"
        "Get the official files by one of:\n"
        "  - apt-get install dataset-fashion-mnist   (installs them in /usr/share/datasets/fashion-mnist)\n"
        f"  - put the four *-ubyte[.gz] files in a directory and set {ENV_VAR}=/that/dir "
        "(or pass root=...)\n"
        "  - load_fashion_mnist(..., root=DIR, download=True) to fetch them from the official mirrors"
    )


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataIntegrityError(f"{path}: not a valid gzip file or truncated ({exc})") from exc


def parse_idx(data: bytes, *, source: str = "<bytes>") -> torch.Tensor:
    """Parse an IDX file of unsigned bytes into a uint8 tensor of the shape in its header."""
    if len(data) < 4:
        raise DataIntegrityError(f"{source}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] != _IDX_DTYPE_UBYTE:
        raise DataIntegrityError(
            f"{source}: bad IDX magic number {data[:4].hex()} (expected 0000 08 0N for unsigned bytes)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataIntegrityError(f"{source}: IDX header of {ndim} dims is truncated ({len(data)} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + _prod(dims)
    if len(data) != expected:
        raise DataIntegrityError(
            f"{source}: IDX header says shape {tuple(dims)} = {expected} bytes, file has {len(data)} "
            "(truncated or corrupt)"
        )
    flat = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return flat.reshape(dims)


def _prod(dims: list[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _load_file(path: Path, stem: str, verify: bool) -> torch.Tensor:
    data = _read_bytes(path)
    tensor = parse_idx(data, source=str(path))
    if verify:
        md5 = hashlib.md5(data).hexdigest()
        if md5 != MD5_RAW[stem]:
            raise DataIntegrityError(
                f"{path}: MD5 of the uncompressed data is {md5}, the official file has "
                f"{MD5_RAW[stem]}. The file is corrupt or not the official Fashion-MNIST release; "
                "delete it and get the official files."
            )
    return tensor


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one official split.

    Returns ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)`` with N = 60000
    for ``"train"`` and 10000 for ``"test"``. ``download=True`` fetches missing files into
    ``root`` (or ``$TENSORSLIM_DATA``) from the official mirrors, checksum-verified.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    dirs = candidate_dirs(root)
    tensors = []
    for stem in SPLITS[split]:
        path = _find_file(stem, dirs)
        if path is None and download:
            path = download_file(stem, _download_dir(root))
        if path is None:
            raise FileNotFoundError(_missing_message(stem, dirs))
        tensors.append(_load_file(path, stem, verify))
    images, labels = tensors
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataIntegrityError(
            f"Fashion-MNIST {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
            "do not match (expected (N, 28, 28) and (N,))"
        )
    return images, labels.to(torch.int64)


def _download_dir(root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    raise ValueError(
        f"download=True needs a directory to write to: pass root=... or set {ENV_VAR} "
        f"({SYSTEM_DIR} is managed by the system package)"
    )


def download_file(stem: str, directory: Path, *, timeout: float = 60.0) -> Path:
    """Fetch ``stem + '.gz'`` from the official mirrors into ``directory``.

    The file is written to a temporary name, its MD5 is checked against the upstream value
    and only then renamed into place. Raises ``OSError`` if no mirror delivers a good copy.
    """
    if stem not in MD5_GZ:
        raise ValueError(f"unknown Fashion-MNIST file {stem!r}; known: {sorted(MD5_GZ)}")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (stem + ".gz")
    errors: list[str] = []
    for mirror in MIRRORS:
        url = mirror + stem + ".gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                payload = resp.read()
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        md5 = hashlib.md5(payload).hexdigest()
        if md5 != MD5_GZ[stem]:
            errors.append(f"{url}: MD5 {md5} != official {MD5_GZ[stem]}")
            continue
        atomic_write_bytes(target, payload)
        return target
    raise OSError(f"could not download {stem}.gz:\n  " + "\n  ".join(errors))


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same directory + rename."""
    from tensorslim.files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))

