"""The bottleneck cache: hit, resume after an interruption, damage, unreadable files."""
import shutil

import h5py
import numpy as np
import pytest

from dsconv import DsconvError, bottlenecks, images, weights
from tests.conftest import CHEST


@pytest.fixture(scope="module")
def net(weights_dir):
    return weights.load_file(weights_dir / "mobilenet_0.25_224_no_top.h5", 0.25, 128)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """16 chest X-rays copied into a temporary folder."""
    d = tmp_path_factory.mktemp("xrays")
    out = []
    for cls in ("NORMAL", "PNEUMONIA"):
        for src in sorted((CHEST / cls).glob("*.jpeg"))[:8]:
            out.append(d / src.name)
            shutil.copyfile(src, out[-1])
    return out


@pytest.fixture
def calls(net, monkeypatch):
    """Count the images that go through the network."""
    seen = []
    forward = net.forward

    def counting(x):
        seen.append(len(x))
        return forward(x)
    monkeypatch.setattr(net, "forward", counting)
    return seen


@pytest.mark.slow
def test_matches_network_and_cache_hit(net, paths, calls, tmp_path):
    feats, failed = bottlenecks.extract(paths, net, "pooled", tmp_path, batch=5, progress=False)
    assert not failed and feats.shape == (16, 256) and sum(calls) == 16
    direct, _ = net.forward(np.stack([images.load(p, 128) for p in paths[:3]]))
    assert np.array_equal(feats[:3], direct)
    calls.clear()
    again, _ = bottlenecks.extract(paths[::-1], net, "pooled", tmp_path, progress=False)
    assert calls == [] and np.array_equal(again, feats[::-1])
    names = [f.name for f in next(tmp_path.iterdir()).iterdir() if not f.name.startswith(".")]
    assert names == [bottlenecks.MERGED]


def test_resume_after_interruption(net, paths, calls, tmp_path, monkeypatch):
    reference, _ = bottlenecks.extract(paths, net, "pooled", False, progress=False)
    forward = net.forward

    def interrupted(x):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(x)
    monkeypatch.setattr(net, "forward", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        bottlenecks.extract(paths, net, "pooled", tmp_path, batch=4, progress=False)
    assert calls == [4, 4]
    # a process killed while writing leaves a half-written temporary file
    variant_dir = next(tmp_path.iterdir())
    (variant_dir / "part-1-1.h5.tmp").write_bytes(b"\x89HDF half written")
    monkeypatch.setattr(net, "forward", forward)
    calls.clear()
    feats, _ = bottlenecks.extract(paths, net, "pooled", tmp_path, batch=4, progress=False)
    assert sum(calls) == 8 and np.array_equal(feats, reference)


@pytest.mark.parametrize("damage", ["garbage", "one value", "truncated"])
def test_damaged_cache_rebuilt(net, paths, calls, tmp_path, capsys, damage):
    feats, _ = bottlenecks.extract(paths, net, "pooled", tmp_path, progress=False)
    cache_file = next(tmp_path.iterdir()) / bottlenecks.MERGED
    if damage == "garbage":
        cache_file.write_bytes(b"this is not HDF5")
    elif damage == "truncated":
        cache_file.write_bytes(cache_file.read_bytes()[:5000])
    else:
        with h5py.File(cache_file, "r+") as f:
            f["features"][3, 5] += 1
    calls.clear()
    again, _ = bottlenecks.extract(paths, net, "pooled", tmp_path, progress=False)
    assert str(cache_file) in capsys.readouterr().err
    assert sum(calls) == 16 and np.array_equal(again, feats)


def test_damaged_cache_warns(net, paths, tmp_path, capsys):
    bottlenecks.extract(paths[:2], net, "pooled", tmp_path, progress=False)
    cache_file = next(tmp_path.iterdir()) / bottlenecks.MERGED
    with h5py.File(cache_file, "r+") as f:
        f["features"][0, 0] += 1
    bottlenecks.extract(paths[:2], net, "pooled", tmp_path, progress=False)
    err = capsys.readouterr().err
    assert str(cache_file) in err and "checksum" in err


def test_other_variant_misses(net, paths, calls, tmp_path, weights_dir):
    bottlenecks.extract(paths[:4], net, "pooled", tmp_path, progress=False)
    at160 = weights.load_file(weights_dir / "mobilenet_0.25_224_no_top.h5", 0.25, 160)
    calls.clear()
    feats, _ = bottlenecks.extract(paths[:4], at160, "pooled", tmp_path, progress=False)
    assert feats.shape == (4, 256) and len(list(tmp_path.iterdir())) == 2
    with pytest.raises(DsconvError, match="ImageNet head"):
        bottlenecks.extract(paths[:4], net, "logits", tmp_path, progress=False)


def test_unreadable_files_skipped_with_names(net, paths, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpeg").write_bytes(b"")
    (bad / "corrupt.jpeg").write_bytes(paths[0].read_bytes()[:300])
    (bad / "notes.txt").write_text("radiologist notes")
    mixed = [paths[0], bad / "empty.jpeg", bad / "corrupt.jpeg", paths[1], bad / "notes.txt"]
    feats, failed = bottlenecks.extract(mixed, net, "pooled", tmp_path / "cache", progress=False)
    assert set(failed) == {bad / "empty.jpeg", bad / "corrupt.jpeg", bad / "notes.txt"}
    assert feats.shape == (2, 256)
    err = capsys.readouterr().err
    assert all(name in err for name in ("empty.jpeg", "corrupt.jpeg", "notes.txt"))


def test_with_top_and_no_top_share_pooled(net, paths, calls, tmp_path, weights_dir):
    # the cache keys the backbone's tensors, not the file: either file of an alpha, converted in either
    # order, finds the other's pooled bottlenecks; the logits key the head too
    bottlenecks.extract(paths[:4], net, "pooled", tmp_path, progress=False)
    top = weights.load_file(weights_dir / "mobilenet_0.25_224.h5", 0.25, 128)
    assert top.weights_sha256 != net.weights_sha256
    assert top.tensors_sha256() == net.tensors_sha256() != top.tensors_sha256(head=True)
    seen = []
    forward = top.forward
    top.forward = lambda x: seen.append(len(x)) or forward(x)
    feats, _ = bottlenecks.extract(paths[:4], top, "pooled", tmp_path, progress=False)
    assert seen == [] and len(list(tmp_path.iterdir())) == 1
    direct, _ = top.forward(np.stack([images.load(p, 128) for p in paths[:4]]))
    assert np.array_equal(feats, direct)
    bottlenecks.extract(paths[:4], top, "logits", tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match="ImageNet head"):
        net.tensors_sha256(head=True)


@pytest.mark.parametrize("alpha", [0.25, 0.75, 1.0])
def test_keras_files_of_an_alpha_hold_one_backbone(weights_dir, alpha):
    top = weights.load_file(weights_dir / f"mobilenet_{alpha:g}_224.h5")
    no_top = weights.load_file(weights_dir / f"mobilenet_{alpha:g}_224_no_top.h5")
    assert top.tensors_sha256() == no_top.tensors_sha256()


def test_resolutions_of_an_alpha_decode_once(net, paths, tmp_path, weights_dir, monkeypatch):
    nets = [net] + [weights.load_file(weights_dir / "mobilenet_0.25_224.h5", 0.25, r) for r in (160, 224)]
    opened = []
    open_image = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a, **k: opened.append(a[0]) or open_image(*a, **k))
    seconds = [0.0] * 3
    got, failed = bottlenecks.extract(paths[:6], nets, ("pooled",), tmp_path, batch=4, progress=False,
                                      seconds=seconds)
    assert not failed and len(opened) == 6 and all(s > 0 for s in seconds)
    opened.clear()
    for n, feats in zip(nets, got):
        alone, _ = bottlenecks.extract(paths[:6], n, "pooled", False, progress=False)
        assert np.array_equal(feats["pooled"], alone)
        cached, _ = bottlenecks.extract(paths[:6], n, "pooled", tmp_path, progress=False)
        assert np.array_equal(cached, alone)
    assert len(opened) == 6 * len(nets)  # the runs without a cache; the cached ones decode nothing
