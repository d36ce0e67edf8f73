"""The external folder's two patient halves, as a user's site sample and its later patients, in both forms.

    python bench/halves.py /tmp/halves

makes /tmp/halves/{A,B}/{copies,full}/{NORMAL,PNEUMONIA}: links to the 224 copies of
../shared/data/chest_xray/external and to the same X-rays at original size in external_full,
whole patients to one half (dsconv.repeats.folds, seed 0). docs/forms.md trains on one half's
copies (--val-dir) and scores the other half's copies and originals (dsconv.consistency).
"""
import sys
from pathlib import Path

from dsconv import data, repeats

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray"


def main(out):
    ext = data.scan(SHARED / "external")
    fold = repeats.folds(ext.paths, ext.labels, 2, 0)
    for path, half in zip(ext.paths, fold):
        for form, source in (("copies", "external"), ("full", "external_full")):
            link = Path(out) / "AB"[half] / form / path.parent.name / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(SHARED / source / path.parent.name / path.name)
    print(f"{out}: A {int((fold == 0).sum())} and B {int((fold == 1).sum())} X-rays, as copies and at full size")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "halves")
