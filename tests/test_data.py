import pickle

import numpy as np
import pytest
import torch

from sparseforge.data import BatchLoader, augment_crop_flip, load_cifar, load_dataset, make_synthetic
from sparseforge.errors import DataError

from conftest import shared_or_skip


def _write_fake_cifar(d, n=20, with_evil=False):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)
    return d


def test_reads_python_batches(tmp_path):
    d = _write_fake_cifar(tmp_path / "cifar-10-batches-py")
    tr = load_cifar("cifar10", d, "train")
    assert tr.images.shape == (100, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert tr.classes[3] == "c3"
    # the parent directory works too
    assert len(load_cifar("cifar10", tmp_path, "test")) == 20


def test_refuses_malicious_pickle(tmp_path):
    d = _write_fake_cifar(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing to load global"):
        load_cifar("cifar10", d, "test")


def test_missing_and_wrong_dirs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar("cifar10", tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no cifar10 train files"):
        load_cifar("cifar10", tmp_path / "empty", "train")
    (tmp_path / "bad").mkdir()
    for n in [f"data_batch_{i}" for i in range(1, 6)]:
        (tmp_path / "bad" / n).write_text("hello")
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        load_cifar("cifar10", tmp_path / "bad", "train")


def test_download_checks_md5(tmp_path):
    import io
    import tarfile

    src = _write_fake_cifar(tmp_path / "src" / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src, arcname="cifar-10-batches-py")
    (tmp_path / "a.tar.gz").write_bytes(buf.getvalue())
    url = (tmp_path / "a.tar.gz").as_uri()
    with pytest.raises(DataError, match="md5"):
        load_cifar("cifar10", tmp_path / "dl", "train", download=True, url=url, md5="0" * 32)
    import hashlib

    ds = load_cifar("cifar10", tmp_path / "dl", "train", download=True, url=url, md5=hashlib.md5(buf.getvalue()).hexdigest())
    assert len(ds) == 100


def test_augment_is_a_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (64, 3, 32, 24), dtype=torch.uint8)  # non-square
    y = augment_crop_flip(x, 4, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    # with pad 0 and only flips, each output is the image or its mirror
    y0 = augment_crop_flip(x, 0, torch.Generator().manual_seed(1))
    for a, b in zip(x, y0):
        assert torch.equal(a, b) or torch.equal(a.flip(-1), b)
    # some outputs must differ from the input (randomness is applied)
    assert not torch.equal(y, x)
    # a padded crop of an image contains each kept pixel unchanged: centre crop offsets (4,4) exist somewhere
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    i = 0
    ok = any(torch.equal(y[i], padded[i, :, dy:dy + 32, dx:dx + 24]) or torch.equal(y[i], padded[i, :, dy:dy + 32, dx:dx + 24].flip(-1))
             for dy in range(9) for dx in range(9))
    assert ok


def test_loader_reproducible_and_resumable():
    ds = make_synthetic(300, seed=3)
    a = BatchLoader(ds, 64, shuffle=True, augment=True, seed=5, drop_last=True)
    full = list(a.iterate(epoch=2))
    tail = list(a.iterate(epoch=2, start_batch=2))
    assert len(full) == 4 and len(tail) == 2
    for (x1, y1), (x2, y2) in zip(full[2:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = list(a.iterate(epoch=3))
    assert not torch.equal(full[0][1], other[0][1])


def test_loader_normalisation_matches_formula():
    ds = make_synthetic(10)
    x, _ = next(BatchLoader(ds, 10, normalize="imagenet").iterate())
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.images.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_loader_shards_for_ddp():
    ds = make_synthetic(101)
    parts = [torch.cat([y for _, y in BatchLoader(ds, 10, rank=r, world_size=2).iterate()]) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 51


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(200, seed=1), make_synthetic(200, seed=1)
    assert torch.equal(a.images, b.images)
    assert torch.bincount(a.labels).tolist() == [20] * 10
    assert not torch.equal(a.images, make_synthetic(200, seed=2).images)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("cifar10")


def test_shared_cifar_loads(cifar_dir):
    tr = load_cifar("cifar10", cifar_dir, "train")
    te = load_cifar("cifar10", cifar_dir, "test")
    assert len(tr) == 50000 and len(te) == 10000
    assert torch.bincount(te.labels).tolist() == [1000] * 10


def _write_jpeg_npz(path, images, labels, split="train", **extra):
    import io

    from PIL import Image

    files = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im.transpose(1, 2, 0)).save(buf, format="JPEG", quality=95)
        files.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    off = np.concatenate([[0], np.cumsum([f.size for f in files])]).astype(np.int64)
    arrays = {f"{split}_jpeg": np.concatenate(files), f"{split}_offsets": off,
              f"{split}_labels": np.asarray(labels, dtype=np.uint8)}
    arrays.update(extra)
    np.savez(path, **arrays)
    return arrays


def test_jpeg_npz_archive_reads_like_the_images_it_holds(tmp_path):
    """A JPEG archive (the shared cifar10-jpeg.npz layout) is a data_dir: images within JPEG error of what was
    written, exact labels, the CIFAR-10 class names; a damaged archive is an error that says what is wrong."""
    from PIL import Image

    rng = np.random.default_rng(0)
    # smooth images: JPEG keeps them within a few grey levels (noise would not survive compression)
    yy, xx = np.mgrid[0:32, 0:32]
    imgs = np.stack([np.stack([(yy * a + xx * b + c) % 256 for a, b, c in rng.integers(0, 5, (3, 3))])
                     for _ in range(12)]).astype(np.uint8)
    labels = rng.integers(0, 10, 12)
    arrays = _write_jpeg_npz(tmp_path / "d.npz", imgs, labels)
    ds = load_cifar("cifar10", tmp_path / "d.npz", "train")
    assert ds.images.shape == (12, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == labels.tolist() and ds.classes[0] == "airplane"
    assert (ds.images.float() - torch.from_numpy(imgs).float()).abs().mean() < 4
    # each image is exactly what Pillow decodes from its own file
    third = arrays["train_jpeg"][arrays["train_offsets"][2]:arrays["train_offsets"][3]].tobytes()
    import io
    assert np.array_equal(ds.images[2].permute(1, 2, 0).numpy(), np.asarray(Image.open(io.BytesIO(third)).convert("RGB")))
    with pytest.raises(DataError, match="has no test_jpeg, test_offsets, test_labels"):
        load_cifar("cifar10", tmp_path / "d.npz", "test")
    bad = dict(arrays)
    bad["train_offsets"] = bad["train_offsets"].copy()
    bad["train_offsets"][-1] += 5
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DataError, match="increasing boundaries"):
        load_cifar("cifar10", tmp_path / "bad.npz", "train")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_cifar("cifar10", tmp_path / "junk.npz", "train")


def test_shared_jpeg_archive_equals_the_python_batches(cifar_dir):
    """../shared/data/cifar10-jpeg.npz decodes to the very pixels of the python batches (they were decoded from it)."""
    npz = shared_or_skip(cifar_dir.parent / "cifar10-jpeg.npz")
    # the test split (10k images): the train split is the same code on 5x the data (checked once by hand: equal)
    a, b = load_cifar("cifar10", npz, "test"), load_cifar("cifar10", cifar_dir, "test")
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
