"""The ImageNet sanity check of Keras' own test: elephant.jpg is African_elephant."""
import pytest

from dsconv import imagenet
from tests.conftest import SAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("alpha", ["0.25", "0.75", "1.0"])
def test_elephant(converted, capsys, alpha):
    with pytest.raises(SystemExit) as e:
        imagenet.main([str(SAMPLES / "elephant.jpg"), "--alpha", alpha])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1] == "African_elephant", lines


def test_unreadable_image_reported(converted, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as e:
        imagenet.main([str(bad), str(SAMPLES / "burger.jpg"), "--alpha", "0.25"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "bad.jpg" in captured.err and "cheeseburger" in captured.out


def test_alpha_1_top1_of_every_sample(converted, capsys):
    # the top-1 classes Keras gives at 224 for every alpha (../shared/reference/README.md)
    with pytest.raises(SystemExit) as e:
        imagenet.main([str(SAMPLES / f) for f in ("elephant.jpg", "cheetah.jpg", "burger.jpg")] + ["--alpha", "1.0"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    tops = [lines[i + 1].split()[1:] for i, line in enumerate(lines) if "(MobileNet 1-224)" in line]
    assert tops == [["African_elephant", "386"], ["cheetah", "293"], ["cheeseburger", "933"]], lines
