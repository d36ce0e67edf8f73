"""Issue 27, "nothing lost, nothing silently wrong: the second round": each failure found, re-run.

Divergence, outputs, inputs, resource bounds, exit statuses, CSV cells. Damaged
HDF5 files are in tests/test_robustness_hdf5.py, the server in tests/test_serve.py.
"""
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from dsconv import calibrate, data, predict, train
from tests.conftest import CHEST, REPO, copy_xrays, train_small


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """16 chest X-rays per class."""
    return copy_xrays(tmp_path_factory.mktemp("xrays"), 16, 70)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, weights_dir, small, cache):
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSCONV_WEIGHTS", str(weights_dir))
        mp.setenv("DSCONV_KERAS_WEIGHTS", "")
        return train_small(small, out, cache, 100, "--tta", "none")


def exit_of(call):
    """The SystemExit code of call(), failing the test (not the session) on any other way out."""
    try:
        call()
    except SystemExit as e:
        return e.code
    except BaseException as e:  # a KeyboardInterrupt must not end the test session
        pytest.fail(f"ended with {type(e).__name__}: {e}")
    pytest.fail("did not exit")


# ---- 2. divergence by what the model does


@pytest.mark.parametrize("lr", ["25", "1000"])
def test_overshooting_rate_refused_and_no_model_written(converted, small, cache, tmp_path, capsys, lr):
    out = tmp_path / "run"
    code = exit_of(lambda: train_small(small, out, cache, 100, "--tta", "none", "--lr", lr))
    err = capsys.readouterr().err
    assert code == 2 and "diverged" in err and "use a lower --lr" in err and "Traceback" not in err
    assert not out.exists()


def test_paper_rates_train_without_alarm(converted, small, cache, tmp_path):
    for lr in ("0.01", "0.1"):
        model = train_small(small, tmp_path / lr, cache, 300, "--paper", "--lr", lr, "--split", "50/25/25")
        assert model.is_file()
