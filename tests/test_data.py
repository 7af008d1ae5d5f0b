"""Data layer on real files: generated JPEG ImageFolders and IDX files written by the test."""
import gzip

import numpy as np
import pytest
import torch

from data import decode, fashion_mnist, fixed_batches, folder, get_data, make_loader
from data.errors import DataError
from data.synthetic import make_fashion_mnist, make_image_folder
from helpers import SPLITS


@pytest.fixture
def image_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_image_folder(tmp_path / "img", num_classes=3, train_per_class=10, val_per_class=3, size=20)


def test_subval_split_is_disjoint_stable_and_saved(image_root, tmp_path):
    a = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    train_paths = {p for p, _ in a.train.samples}
    sub_paths = {p for p, _ in a.subval.samples}
    assert len(sub_paths) == 12 and len(train_paths) == 18 and not train_paths & sub_paths
    assert [t for _, t in a.subval.samples].count(0) == 4  # per class
    assert (tmp_path / a.split_file).is_file() and a.split_file.parent == SPLITS
    saved = a.split_file.read_text()
    b = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    assert {p for p, _ in b.subval.samples} == sub_paths and a.split_file.read_text() == saved
    full = get_data("imagenet", str(image_root), 16, val_per_class=4, hold_out=False)
    assert len(full.train) == 30 and full.subval is None  # retraining uses all of train
    assert len(a.val) == 9 and a.num_classes == 3


def test_deferred_split_is_written_only_when_asked(image_root):
    a = get_data("imagenet", str(image_root), 16, val_per_class=4, defer_split=True, split_dir=SPLITS)
    assert not a.split_file.exists()  # a run that then stops on bad input leaves nothing behind
    a.save_split()
    b = get_data("imagenet", str(image_root), 16, val_per_class=4, defer_split=True, split_dir=SPLITS)
    assert b.pending_split is None and [p for p, _ in b.subval.samples] == [p for p, _ in a.subval.samples]


def test_split_is_redrawn_identically_without_its_file(image_root):
    a = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    a.split_file.unlink()
    b = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    assert [p for p, _ in a.subval.samples] == [p for p, _ in b.subval.samples]


def test_split_file_that_no_longer_matches_is_an_error(image_root):
    a = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    victim = a.subval.samples[0][0]
    import os
    os.unlink(victim)
    with pytest.raises(DataError, match="does not match the data"):
        get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)


def test_too_few_images_per_class(image_root):
    with pytest.raises(DataError, match="class 'class_000' has 10 training images.*--val-per-class 10"):
        get_data("imagenet", str(image_root), 16, val_per_class=10, split_dir=SPLITS)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_val"])
def test_bad_data_root(tmp_path, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    if layout != "missing":
        (root / "train" / "a").mkdir(parents=True)
    if layout == "no_val":
        make_image_folder(root, 2, 3, 1, 8)
        import shutil
        shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=r"--data-root .*(no train/|holds no images|no val/)"):
        get_data("imagenet", str(root), 16, split_dir=SPLITS)


def test_imagefolder_tensors_and_loader(image_root):
    data = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 3
    loader = make_loader(data.train, 4, True, 0, seed=1)
    loader.sampler.set_epoch(0)
    first = [yb.tolist() for _, yb in loader]
    loader.sampler.set_epoch(0)
    assert [yb.tolist() for _, yb in loader] == first  # order is a function of (seed, epoch)
    loader.sampler.set_epoch(1)
    assert [yb.tolist() for _, yb in loader] != first
    recal = list(fixed_batches(data.train_eval, 2, 5, seed=0))
    assert len(recal) == 2 and recal[0].shape == (5, 3, 16, 16)
    torch.testing.assert_close(recal[0], next(iter(fixed_batches(data.train_eval, 2, 5, seed=0))))


def test_decoded_sets_are_uint8_and_give_the_batches_of_torchvision_transforms(image_root):
    from PIL import Image
    from torchvision import transforms as T

    data = get_data("imagenet", str(image_root), 16, val_per_class=4, split_dir=SPLITS)
    # the reference: torchvision's own float pipeline, image by image, straight from the files
    reference = T.Compose([T.Resize(18), T.CenterCrop(16), T.ToTensor(), T.Normalize(folder.MEAN, folder.STD)])

    def expected(samples):
        images = []
        for path, _ in samples:
            with Image.open(path) as img:
                images.append(reference(img.convert("RGB")))
        return torch.stack(images)

    subval = decode(data.subval, 5, torch.device("cpu"))
    assert subval.images.dtype == torch.uint8 and subval.images.shape == (12, 3, 16, 16)
    batches = list(subval)
    assert [len(y) for _, y in batches] == [5, 5, 2]  # the batches of a loader with batch size 5
    assert torch.equal(torch.cat([x for x, _ in batches]), expected(data.subval.samples))
    assert torch.cat([y for _, y in batches]).tolist() == [t for _, t in data.subval.samples]
    recal = fixed_batches(data.train_eval, 2, 4, seed=3)
    order = torch.randperm(len(data.train_eval), generator=torch.Generator().manual_seed(3))[:8].tolist()
    assert torch.equal(torch.cat(list(recal)), expected([data.train_eval.samples[i] for i in order]))


@pytest.fixture
def fmnist_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_fashion_mnist(tmp_path / "fm", train_per_class=12, test_per_class=3)


def test_fashion_mnist_from_data_root(fmnist_root):
    data = get_data("fashionmnist", str(fmnist_root), 32, val_per_class=2, split_dir=SPLITS)
    assert len(data.train) == 100 and len(data.subval) == 20 and len(data.val) == 30 and data.num_classes == 10
    x, y = next(iter(make_loader(data.train, 16, True, 0)))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,) and torch.equal(x[:, 0], x[:, 1])  # gray → 3 channels
    ev, ey = next(iter(make_loader(data.val, 4, False, 0)))
    raw = fashion_mnist.read_idx(fmnist_root / "t10k-images-idx3-ubyte.gz")[:4]
    expected = (torch.from_numpy(raw.astype(np.float32)) / 255 - fashion_mnist.MEAN) / fashion_mnist.STD
    torch.testing.assert_close(ev[:, 0, 2:30, 2:30], expected)  # eval: padded, not cropped
    assert ey.tolist() == [0, 1, 2, 3]
    background = -fashion_mnist.MEAN / fashion_mnist.STD
    assert torch.allclose(ev[:, :, :2], torch.full_like(ev[:, :, :2], background))
    # train: every image is a crop of its 4-pixel-padded eval image, possibly flipped, and crops vary
    eval_view = fashion_mnist.FashionMNIST(data.train.images, data.train.labels, 32, train=False)
    plain, _ = eval_view.__getitems__(list(range(8)))
    aug, _ = data.train.__getitems__(list(range(8)))
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4), value=background)
    found = set()
    for p, a in zip(padded, aug):
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if torch.equal(p[:, dy:dy + 32, dx:dx + 32].flip(-1) if f else p[:, dy:dy + 32, dx:dx + 32], a)]
        assert matches
        found.add(matches[0])
    assert len(found) > 1
    # augmentation is a function of (seed, epoch, sample): the same again, in any batch; another epoch differs
    torch.testing.assert_close(data.train.__getitems__(list(range(8)))[0], aug)
    torch.testing.assert_close(data.train.__getitems__([9, 5, 2])[0][1:], aug[[5, 2]])
    data.train.set_epoch(1)
    assert not torch.equal(data.train.__getitems__(list(range(8)))[0], aug)


def test_fashion_mnist_split_belongs_to_its_files(fmnist_root, tmp_path):
    a = get_data("fashionmnist", str(fmnist_root), 32, val_per_class=2, split_dir=SPLITS)
    other = make_fashion_mnist(tmp_path / "other", train_per_class=13, test_per_class=3)
    b = get_data("fashionmnist", str(other), 32, val_per_class=2, split_dir=SPLITS)
    assert a.split_file != b.split_file and a.split_file.is_file() and b.split_file.is_file()
    assert len(b.train) == 110


def test_fashion_mnist_truncated_file(fmnist_root):
    path = fmnist_root / "train-labels-idx1-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    with gzip.open(path, "wb") as f:
        f.write(data[:-5])
    with pytest.raises(DataError, match="truncated IDX file"):
        get_data("fashionmnist", str(fmnist_root), 32, val_per_class=2, split_dir=SPLITS)


def test_fashion_mnist_missing_names_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setattr("torchvision.datasets.FashionMNIST.__init__",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("network unreachable")))
    with pytest.raises(DataError) as e:
        get_data("fashionmnist", str(tmp_path / "empty"), 32, split_dir=SPLITS)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg and "internet" in msg
