import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A shell that starts the suite in the background (`pytest &` without job control) leaves SIGINT ignored, and
# Python keeps it so; the tests of what Ctrl-C does need it to raise KeyboardInterrupt, as at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
SHARED = REPO.parent / "shared"
KERAS = SHARED / "weights" / "keras"
REFERENCE = SHARED / "reference" / "keras_mobilenet_reference.h5"
SAMPLES = SHARED / "weights" / "sample_images"
CHEST = SHARED / "data" / "chest_xray" / "train"
ORIGINALS = SHARED / "data" / "originals"

# Tests that read ../shared (the data, Keras' weights, Keras' reference outputs) carry the `shared`
# marker, or use the weights_dir fixture, which gets it here. On a bare clone they skip with the
# reason; CI sets DSCONV_REQUIRE_SHARED=1, under which a missing ../shared is an error, so that
# no test CI should run is skipped there.
HAVE_SHARED = SHARED.is_dir()
REQUIRE_SHARED = os.environ.get("DSCONV_REQUIRE_SHARED", "") not in ("", "0")


def pytest_configure(config):
    if REQUIRE_SHARED and not HAVE_SHARED:
        raise pytest.UsageError(f"DSCONV_REQUIRE_SHARED is set and the shared data is missing: {SHARED}; "
                                "put the shared folder beside the repository, or unset it to skip those tests")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"needs the shared data at {SHARED}, which is missing")
    for item in items:
        if "weights_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)
        if not HAVE_SHARED and item.get_closest_marker("shared"):
            item.add_marker(skip)


def copy_xrays(root, per_class, step):
    """Every step-th chest X-ray, per_class of each class, copied to root/CLASS; returns root."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((CHEST / cls).glob("*.jpeg"))[::step][:per_class]:
            shutil.copyfile(src, root / cls / src.name)
    return root


# The pipeline without the forms' defaults (no random forms, no projection, no blur, no test-time forms), whose
# parts the tests rebuild from the modules below train; tests/test_forms.py and tests/test_form_tta.py cover the
# defaults, and `extra` may restore them.
PLAIN = ("--forms", "0", "--invariance", "0", "--blur", "0", "--form-tta", "0")


def exit_of(call):
    """The SystemExit code of call(), failing the test (not the session) on any other way out."""
    try:
        call()
    except SystemExit as e:
        return e.code
    except BaseException as e:  # a KeyboardInterrupt must not end the test session
        pytest.fail(f"ended with {type(e).__name__}: {e}")
    pytest.fail("did not exit")


def train_small(data, out, cache, steps, *extra):
    """A small 0.25-128 model trained on `data` (split by image, 50/25/25, one repeat), written to out/model.h5."""
    from dsconv import train
    train.main(["--data", str(data), "--alpha", "0.25", "--resolution", "128", "--split", "50/25/25",
                "--group-by", "image", "--repeats", "1", "--steps", str(steps), "--lr", "0.1",
                "--cache", str(cache), "--out", str(out), *PLAIN, *extra])
    return Path(out) / "model.h5"


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    """The Keras files of ../shared converted once into a temporary folder."""
    from dsconv import weights
    out = tmp_path_factory.mktemp("weights")
    for path in sorted(KERAS.glob("*.h5")):
        weights.convert(path, out)
    return out


@pytest.fixture
def converted(weights_dir, monkeypatch):
    """DSCONV_WEIGHTS pointing at the converted files, no Keras fallback."""
    monkeypatch.setenv("DSCONV_WEIGHTS", str(weights_dir))
    monkeypatch.setenv("DSCONV_KERAS_WEIGHTS", "")
    return weights_dir


@pytest.fixture
def readonly():
    """A context manager making a folder read-only, for root too (which ignores permission bits)."""
    @contextmanager
    def make(folder):
        root = os.geteuid() == 0
        if root:
            if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
        else:
            folder.chmod(0o555)
        try:
            yield folder
        finally:
            if root:
                subprocess.run(["chattr", "-i", str(folder)], check=True)
            else:
                folder.chmod(0o755)
    return make
