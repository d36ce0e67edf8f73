"""What a training is, as a value: the settings of python -m dsconv.train, built once from its flags.

dsconv.repeats trains and chooses by them, and dsconv.outputs records them
in results.json and in every model file's ``training``. The run's own
options (--out, --cache, --workers, --overwrite, --max-pixels) are no part
of them: they change where and how fast, not what is trained.
"""
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """The flags of python -m dsconv.train (see its --help), in its order; lists as tuples."""
    data: str
    test_dir: str
    val_dir: str
    site_dir: str  # None: adapt to no site
    alpha: tuple
    tta: str
    forms: int
    invariance: int
    blur: float
    form_tta: int
    resolution: int
    bottleneck: str
    split: str
    group_by: str
    repeats: int
    positive: str
    subtypes: bool
    lr: float
    steps: tuple
    batch_size: int
    sampling: str
    eval_every: int
    standardize: bool
    weight_decay: tuple
    paper: bool
    site_weight: int
    threshold_rule: str
    target_sensitivity: float

    @classmethod
    def from_args(cls, args):
        """The settings of train's parsed arguments: --site-dir is --val-dir unless given, and 'none' is None."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        site_dir = args.val_dir if args.site_dir is None else args.site_dir
        return cls(**dict(values, site_dir=None if site_dir == "none" else site_dir, alpha=tuple(args.alpha),
                          steps=tuple(args.steps), weight_decay=tuple(args.weight_decay)))

