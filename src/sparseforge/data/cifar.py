"""CIFAR-10 / CIFAR-100 readers for the original python-batch format.

The batch files are Python pickles. We never unpickle arbitrary objects: a
restricted unpickler accepts only the three numpy globals these files use to
store the uint8 array, and rejects anything else with a clear error.
Download is optional (for users with internet) and checked against the
published md5 before extraction.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .dataset import ImageDataset

def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as r  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as r
    return r


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode arguments")
    return text.encode("latin1")


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes in protocol 2
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as e:
        raise DataError(
            f"{path} is not a CIFAR python batch ({type(e).__name__}: {e}); "
            "point --data-dir at the extracted 'cifar-10-batches-py' (or 'cifar-100-python') directory"
        ) from None
    if not isinstance(obj, dict) or "data" not in obj:
        raise DataError(f"{path} is not a CIFAR python batch (no 'data' entry)")
    return obj


SPECS = {
    "cifar10": {
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "meta": ("batches.meta", "label_names"),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "num_classes": 10,
    },
    "cifar100": {
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "meta": ("meta", "fine_label_names"),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "num_classes": 100,
    },
}


def _resolve_dir(root: Path, spec: dict) -> Path:
    """Accept the batch directory itself or its parent."""
    if (root / spec["test"][0]).exists() or (root / spec["train"][0]).exists():
        return root
    if (root / spec["dir"]).is_dir():
        return root / spec["dir"]
    return root


def load_cifar(name: str, root: str | Path, split: str = "train", download: bool = False,
               url: str | None = None, md5: str | None = None) -> ImageDataset:
    """Load CIFAR-10/100 ``split`` ('train' or 'test') from ``root``.

    ``root`` may be the batch directory (``.../cifar-10-batches-py``) or its parent.
    With ``download=True`` a missing dataset is fetched (``url``) and its md5 checked first.
    """
    if name not in SPECS:
        raise DataError(f"unknown CIFAR variant {name!r}; use cifar10 or cifar100")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    spec = SPECS[name]
    root = Path(root).expanduser()
    if root.suffix == ".npz" and root.is_file():
        return load_jpeg_npz(root, split, name)
    d = _resolve_dir(root, spec)
    files = [d / f for f in spec[split]]
    if not all(f.exists() for f in files):
        if download:
            download_cifar(name, root, url=url, md5=md5)
            d = _resolve_dir(root, spec)
            files = [d / f for f in spec[split]]
        if not root.exists():
            raise DataError(f"data directory {root} does not exist; pass --data-dir pointing at '{spec['dir']}' (or use --download)")
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise DataError(f"{d} has no {name} {split} files ({', '.join(missing)}); pass the '{spec['dir']}' directory or use --download")
    datas, labels = [], []
    for f in files:
        b = _load_batch(f)
        data = np.asarray(b["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{f}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
        datas.append(data)
        labels.extend(b[spec["label_key"]])
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32).copy())
    y = torch.tensor(labels, dtype=torch.int64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec["num_classes"]):
        raise DataError(f"{d}: labels outside 0..{spec['num_classes'] - 1}; is this {name}?")
    meta_file, meta_key = spec["meta"]
    classes = [str(i) for i in range(spec["num_classes"])]
    if (d / meta_file).exists():
        m = _load_batch_meta(d / meta_file)
        if meta_key in m:
            classes = [str(c) for c in m[meta_key]]
    return ImageDataset(images, y, classes, f"{name}-{split}")


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _decode_jpeg(blob: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def load_jpeg_npz(path: str | Path, split: str = "train", name: str = "cifar10") -> ImageDataset:
    """``split`` of a dataset stored as JPEG files in one ``.npz``: ``{split}_jpeg`` (uint8, the files back to back),
    ``{split}_offsets`` (int64, N + 1 boundaries) and ``{split}_labels``.

    Why: such an archive (``../shared/data/cifar10-jpeg.npz``, 56 MB) is a third of the decoded batches' size, small
    enough to carry to another machine (a GPU box). Loaded with ``allow_pickle=False``; decoded with Pillow (a
    dependency of matplotlib), on threads: Pillow's decoder releases the GIL.
    """
    path = Path(path)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError(f"{path} holds JPEG files: reading it needs Pillow (pip install pillow)") from None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = {k: z[k] for k in (f"{split}_jpeg", f"{split}_offsets", f"{split}_labels") if k in z.files}
            present = sorted(z.files)
    except Exception as e:
        raise DataError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in (f"{split}_jpeg", f"{split}_offsets", f"{split}_labels") if k not in keys]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} (it holds {', '.join(present) or 'nothing'}); a JPEG "
                        f"archive needs {split}_jpeg, {split}_offsets and {split}_labels")
    blob, off, lab = keys[f"{split}_jpeg"], keys[f"{split}_offsets"].astype(np.int64), keys[f"{split}_labels"]
    n = len(lab)
    if (blob.dtype != np.uint8 or blob.ndim != 1 or off.shape != (n + 1,) or off[0] != 0 or off[-1] != blob.size
            or (np.diff(off) <= 0).any()):
        raise DataError(f"{path}: {split}_offsets must be {n + 1} increasing boundaries from 0 to the size of "
                        f"{split}_jpeg (a uint8 vector); the archive is damaged or not in this layout")
    from concurrent.futures import ThreadPoolExecutor

    raw = blob.tobytes()
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as ex:
        try:
            imgs = list(ex.map(_decode_jpeg, (raw[off[i]:off[i + 1]] for i in range(n)), chunksize=256))
        except Exception as e:
            raise DataError(f"{path}: an image of {split}_jpeg does not decode ({type(e).__name__}: {e})") from None
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:
        raise DataError(f"{path}: the {split} images differ in size ({sorted(shapes)[:3]}...); one size is needed")
    spec = SPECS.get(name, {"num_classes": int(lab.max()) + 1 if n else 0})
    y = torch.from_numpy(lab.astype(np.int64))
    if n and (int(y.min()) < 0 or int(y.max()) >= spec["num_classes"]):
        raise DataError(f"{path}: labels outside 0..{spec['num_classes'] - 1}; is this {name}?")
    images = torch.from_numpy(np.stack(imgs).transpose(0, 3, 1, 2).copy()) if n else torch.zeros(0, 3, 32, 32,
                                                                                               dtype=torch.uint8)
    classes = CIFAR10_CLASSES if name == "cifar10" else [str(i) for i in range(spec["num_classes"])]
    return ImageDataset(images, y, list(classes), f"{name}-{split}")


def _load_batch_meta(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            return _SafeUnpickler(f, encoding="latin1").load()
        except Exception:
            return {}


def download_cifar(name: str, root: str | Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download and extract the official archive after checking its md5 (needs internet)."""
    spec = SPECS[name]
    url = url or spec["url"]
    md5 = md5 or spec["md5"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            blob = r.read()
    except Exception as e:
        raise DataError(f"could not download {url} ({e}); download it by hand and pass --data-dir") from None
    got = hashlib.md5(blob).hexdigest()
    if got != md5:
        raise DataError(f"download of {url} has md5 {got}, expected {md5}; the file is corrupt or not {name}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
        tf.extractall(root, filter="data")
    return root / spec["dir"]
