"""The ImageNet sanity check of Keras' own test: elephant.jpg is African_elephant."""
import pytest

from dsconv import classify
from tests.conftest import SAMPLES


@pytest.mark.parametrize("alpha", ["0.25", "0.75"])
def test_elephant(converted, capsys, alpha):
    with pytest.raises(SystemExit) as e:
        classify.main([str(SAMPLES / "elephant.jpg"), "--alpha", alpha])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1] == "African_elephant", lines


def test_unreadable_image_reported(converted, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as e:
        classify.main([str(bad), str(SAMPLES / "burger.jpg"), "--alpha", "0.25"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "bad.jpg" in captured.err and "cheeseburger" in captured.out
