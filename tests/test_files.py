"""dsconv.files: atomic writes on a full disk, locks, stray temporary files, deferred Ctrl-C."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dsconv import files
from tests.conftest import REPO

DEAD_PID = 999999999  # above any pid_max: no such process


def full_disk(script, limit=4096):
    """Run a Python snippet with files limited to ``limit`` bytes (writes beyond fail as on a full disk)."""
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            + textwrap.dedent(script))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_model_save_on_a_full_disk_raises_and_leaves_nothing(tmp_path):
    target = tmp_path / "model.h5"
    r = full_disk(f"""
        import numpy as np
        from dsconv import classifier
        m = classifier.Classifier(np.ones((768, 2)), np.zeros(2), ["A", "B"], positive=1)
        try:
            m.save({str(target)!r})
        except OSError as e:
            print("OSError", e.errno)
        """)
    assert r.returncode == 0, f"crashed with {r.returncode}: {r.stderr[-500:]}"
    assert r.stdout.startswith("OSError 27")  # EFBIG, as ENOSPC would be
    assert list(tmp_path.iterdir()) == [], "no partial model and no temporary file"


def test_write_all_is_all_or_nothing(tmp_path):
    old = tmp_path / "results.json"
    old.write_text("old")
    r = full_disk(f"""
        from pathlib import Path
        from dsconv import files
        d = Path({str(tmp_path)!r})
        try:
            files.write_all({{d / "results.json": b"new", d / "model.h5": bytes(10000)}})
        except OSError:
            print("refused")
        """)
    assert r.stdout.strip() == "refused", r.stderr
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_remove_strays_keeps_live_processes_files(tmp_path):
    dead = tmp_path / f".model.h5.{DEAD_PID}.0.tmp"
    live = tmp_path / f".model.h5.{os.getpid()}.3.tmp"
    other = tmp_path / "notes.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"x")
    assert files.remove_strays(tmp_path) == [dead]
    assert sorted(tmp_path.iterdir()) == sorted([live, other])


def test_lock_excludes_a_second_holder(tmp_path):
    with files.lock(tmp_path / ".lock"):
        with pytest.raises(files.Busy):
            with files.lock(tmp_path / ".lock", wait=False):
                pass
        with pytest.raises(files.Busy):
            with files.lock(tmp_path / ".lock", shared=True, wait=False):
                pass
    with files.lock(tmp_path / ".lock", shared=True), files.lock(tmp_path / ".lock", shared=True, wait=False):
        pass  # readers share


def test_interrupts_deferred_finishes_the_block_then_raises():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with files.interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_check_writable_names_the_folder(tmp_path, readonly):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OSError, match="a-file is not a folder"):
        files.check_writable(tmp_path / "a-file" / "out", "give another --out")
    files.check_writable(tmp_path / "new" / "deeper", "")
    assert not (tmp_path / "new").exists(), "checking creates nothing"
    ro = tmp_path / "ro"
    ro.mkdir()
    with readonly(ro), pytest.raises(OSError, match=f"{ro}: cannot write here.*give another --out"):
        files.check_writable(ro / "out", "give another --out")


def test_checksum_sees_every_byte_and_attribute():
    attrs, tensors = {"threshold": 0.5, "classes": '["A", "B"]'}, {"w": np.arange(6.0).reshape(2, 3)}
    base = files.checksum(attrs, tensors)
    changed = tensors["w"].copy()
    changed[1, 2] = np.nextafter(changed[1, 2], 10)
    assert files.checksum(attrs, {"w": changed}) != base
    assert files.checksum(dict(attrs, threshold=0.51), tensors) != base
    assert files.checksum(attrs, {"w": tensors["w"].reshape(3, 2)}) != base
