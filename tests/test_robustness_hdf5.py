"""Issue 27, item 1: damaged HDF5 structure is refused, never a traceback or a hang.

Bits are flipped across whole files (structure included: the first 4 KB,
where the superblock and root headers live, get half the flips) of each kind
dsconv reads: a model, a converted weight file, a bottleneck cache file. Each
damaged copy must either load to exactly what the original holds (a flip in
unused bytes) or be refused with a DsconvError naming the file.
"""
import os
import shutil
import signal

import numpy as np
import pytest

from dsconv import DsconvError, bottlenecks, classifier, hdf5, weights
from tests.conftest import copy_xrays, train_small

pytestmark = pytest.mark.slow  # each test hangs off a model trained for the module, or trains one

FLIPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights_dir):
    root = tmp_path_factory.mktemp("hdf5")
    data = copy_xrays(root / "data", 8, 90)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        model = train_small(data, root / "run", root / "cache", 50, "--tta", "none")
    return {"model": model, "cache": root / "cache"}


def flipped(path, n, seed):
    """(position, bytes) of n copies of the file, each with one bit flipped."""
    data = path.read_bytes()
    rng = np.random.default_rng(seed)
    positions = np.concatenate([rng.integers(0, min(len(data), 4096), n // 2),
                                rng.integers(0, len(data), n - n // 2)])
    for pos in positions:
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(8))
        yield int(pos), bytes(b)


def fuzz(original, n, seed, load, same, folder, want=None):
    """Counts of (loaded the same as ``want``, by default the original's; refused); fails on anything else."""
    counts = {"same": 0, "refused": 0}
    want = load(original) if want is None else want
    for pos, data in flipped(original, n, seed):
        copy = folder / original.name
        copy.write_bytes(data)
        try:
            got = load(copy)
        except DsconvError as e:
            assert str(copy) in str(e) and "\n" not in str(e), (pos, str(e))
            counts["refused"] += 1
            continue
        assert same(got, want), f"a flip at byte {pos} loaded a different {original.name}"
        counts["same"] += 1
    print(original.name, counts)
    return counts


def test_damaged_model_files_refused(trained, tmp_path):
    def same(a, b):
        return (np.array_equal(a.weights, b.weights) and np.array_equal(a.bias, b.bias)
                and a.threshold == b.threshold and a.classes == b.classes and a.info == b.info)
    counts = fuzz(trained["model"], FLIPS, 1, classifier.load, same, tmp_path)
    assert counts["refused"] > FLIPS // 2


def test_damaged_weight_files_refused_or_converted_again(converted, tmp_path, capsys):
    original = converted / "mobilenet_0.25_224_no_top.h5"
    counts = fuzz(original, FLIPS // 2, 2, lambda p: weights.load_file(p, 0.25, 128),
                  lambda a, b: a.tensors_sha256() == b.tensors_sha256(), tmp_path)
    # the Keras file is at hand in ../shared: every damaged copy is converted again, none refused
    assert counts["same"] == FLIPS // 2 and "converting" in capsys.readouterr().err


def test_damaged_cache_files_removed_and_recomputed(trained, tmp_path, capsys):
    original = next(trained["cache"].glob("*/bottlenecks.h5"))
    a = {k: v.item() if hasattr(v, "item") else v for k, v in hdf5.read(original)[0]["/"].items()
         if k not in ("format", "checksum")}
    rows = bottlenecks._read(original, a)
    width = len(next(iter(rows.values())))
    folder = bottlenecks.folder(tmp_path, a)
    folder.mkdir(parents=True)

    def load(path):
        cache = bottlenecks.Cache(tmp_path, a, width)
        if not path.exists():  # reported and deleted: the next run starts clean
            raise DsconvError(f"{path}: " + capsys.readouterr().err.rstrip("\n"))
        return cache.rows

    def same(got, want):
        return got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    counts = fuzz(original, FLIPS, 3, load, same, folder, rows)
    assert counts["refused"] > FLIPS // 2


def test_a_read_that_loops_or_crashes_is_bounded():
    def loop():
        while True:
            pass
    with pytest.raises(hdf5.Damaged, match="did not finish reading it within"):
        hdf5.in_child(loop, 0.5)
    with pytest.raises(hdf5.Damaged, match="crashed reading it .signal SIGSEGV"):
        hdf5.in_child(lambda: os.kill(os.getpid(), signal.SIGSEGV), 10)
    assert hdf5.in_child(lambda: np.arange(3), 10).tolist() == [0, 1, 2]


def test_damaged_extra_weight_file_skipped(converted, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "weights"
    shutil.copytree(converted, folder)
    junk = folder / "extra.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    monkeypatch.setenv("DSCONV_WEIGHTS", str(folder))
    net = weights.load(0.25, 128, quiet=True)
    assert net.alpha == 0.25 and "extra.h5" in capsys.readouterr().err
    weights.main(["list"])
    out = capsys.readouterr().out
    assert "extra.h5" in out and "damaged" in out and "mobilenet_0.25_224.h5" in out
