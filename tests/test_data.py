"""Patient ids, folder scanning, and splits: Table 1 sizes, stratification, grouping."""
import numpy as np
import pytest

from dsconv import data
from tests.conftest import CHEST


@pytest.mark.parametrize("name, patient", [
    ("person23_bacteria_87.jpeg", "person23"), ("person1_virus_6.jpeg", "person1"),
    ("person1_virus_6_2.jpeg", "person1"), ("IM-0629-0001.jpeg", "IM-0629"),
    ("IM-0629-0001-0002.jpeg", "IM-0629"), ("NORMAL2-IM-0383-0001.jpeg", "NORMAL2-IM-0383"),
    ("scan.png", "x/scan.png")])
def test_patient_id(name, patient):
    assert data.patient_id(f"x/{name}") == patient


@pytest.fixture(scope="module")
def chest():
    return data.scan(CHEST)


TABLE1 = {"80/10/10": (4172, 522, 522), "70/15/15": (3652, 782, 782), "60/20/20": (3130, 1043, 1043)}


@pytest.mark.shared
@pytest.mark.parametrize("split", sorted(TABLE1))
def test_table1_sizes_and_stratification(chest, split):
    assert chest.counts() == {"NORMAL": 1341, "PNEUMONIA": 3875}
    for seed in range(3):
        part = data.split(chest.labels, data.parse_split(split), seed)
        assert tuple(np.bincount(part)) == TABLE1[split]
        for p in range(3):
            n_normal = np.sum(chest.labels[part == p] == 0)
            assert abs(n_normal - TABLE1[split][p] * 1341 / 5216) < 1


@pytest.mark.shared
def test_split_deterministic_and_seeded(chest):
    pct = data.parse_split("80/10/10")
    a, b, c = (data.split(chest.labels, pct, s) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.shared
def test_grouped_split_keeps_patients_together(chest):
    groups = [data.patient_id(p) for p in chest.paths]
    assert len(set(groups)) < len(groups) * 0.6  # patients do have several images
    for split in TABLE1:
        part = data.split(chest.labels, data.parse_split(split), 0, groups)
        sides = {}
        for g, p in zip(groups, part):
            sides.setdefault(g, set()).add(p)
        assert all(len(s) == 1 for s in sides.values())
        for got, want in zip(np.bincount(part), TABLE1[split]):
            assert abs(got - want) <= 0.02 * want, (split, np.bincount(part))
        assert np.array_equal(part, data.split(chest.labels, data.parse_split(split), 0, groups))


@pytest.mark.parametrize("text", ["80/10", "80/10/5", "a/b/c", "0/50/50", "80/-10/30"])
def test_bad_split(text):
    with pytest.raises(data.DataError, match="--split"):
        data.parse_split(text)
    assert data.parse_split("90/10") == (90, 10, 0)


def test_scan_errors(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.scan(tmp_path / "missing")
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "x.jpeg").write_bytes(b"x")
    with pytest.raises(data.DataError, match="at least two"):
        data.scan(tmp_path)
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(data.DataError, match="B: the class folder is empty"):
        data.scan(tmp_path)
    (tmp_path / "B" / "y.jpeg").write_bytes(b"y")
    ds = data.scan(tmp_path)
    assert ds.classes == ["A", "B"] and list(ds.labels) == [0, 1]
    with pytest.raises(data.DataError, match="differ"):
        data.scan(tmp_path, ["A", "C"])
