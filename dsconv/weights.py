"""Keras MobileNet v1 HDF5 -> dsconv HDF5 (batch norm folded), and loading.

    python -m dsconv.weights convert ../shared/weights/keras/*.h5
    python -m dsconv.weights list

A dsconv weight file holds one group per Keras layer name with ``kernel``
and ``bias`` datasets in the layouts of dsconv.kernels, and the attributes
``alpha`` (inferred from the tensor shapes), ``trained_resolution``,
``has_head``, ``source_file``, ``source_sha256`` and ``checksum`` (a sha256
of all the others and of every tensor, verified on loading: a file that
fails it is converted again from its Keras file when that is at hand, and
refused otherwise).

Batch norm is folded into the convolution before it (eps = 1e-3):
``scale = gamma / sqrt(var + eps)``, ``kernel' = kernel * scale`` per output
channel, ``bias' = beta - mean * scale``.
"""
import argparse
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from dsconv import DsconvError, HelpFormatter, fail, files, hdf5, note, warn
from dsconv.mobilenet import ALPHAS, STEM, MobileNet, check_variant, layer_shapes

FORMAT = "dsconv-mobilenet-v1"
BN_EPS = 1e-3
KERAS_NAME = re.compile(r"mobilenet_(1_0|7_5|5_0|2_5)_(\d+)_tf(_no_top)?\.h5$")
CONVERTED_NAME = re.compile(r"mobilenet_([\d.]+)_(\d+)(_no_top)?\.h5")
KERAS_ALPHA = {"1_0": 1.0, "7_5": 0.75, "5_0": 0.5, "2_5": 0.25}


class WeightsError(DsconvError):
    """A weight file that cannot be used, with what to do about it."""


def weights_dir():
    """Where converted files live: $DSCONV_WEIGHTS, else the repository's weights/, else ~/.dsconv/weights."""
    return files.default_dir("DSCONV_WEIGHTS", "weights", Path(".dsconv", "weights"))


def keras_dirs():
    """Where Keras files are looked for when nothing is converted yet."""
    dirs = [Path(p) for p in os.environ.get("DSCONV_KERAS_WEIGHTS", "").split(os.pathsep) if p]
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "weights" / "keras", Path("../shared/weights/keras"),
             Path.home() / ".keras" / "models"]
    return list({d.resolve(): d for d in dirs}.values())


def keras_file_name(alpha, resolution, head=True):
    a = {v: k for k, v in KERAS_ALPHA.items()}[alpha]
    return f"mobilenet_{a}_{resolution}_tf{'' if head else '_no_top'}.h5"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _keras_layer(f, path, name):
    """{weight name without the layer prefix: array} of one Keras layer; f is hdf5.read's (attrs, tensors)."""
    attrs, tensors = f
    if name not in attrs:
        raise WeightsError(f"{path}: layer {name} is missing; this is not a complete "
                           "Keras MobileNet v1 file")
    names = [n.decode() if isinstance(n, bytes) else str(n)
             for n in attrs[name].get("weight_names", [])]
    if not names or any(f"{name}/{n}" not in tensors for n in names):
        raise WeightsError(f"{path}: layer {name} has no weights; the file is damaged or "
                           "incomplete, download it again from Keras applications")
    return {n.split("/")[-1].split(":")[0]: np.asarray(tensors[f"{name}/{n}"], np.float64) for n in names}


def _fold(kernel, bn):
    """Fold batch norm into a kernel whose last axis is the output channel."""
    scale = bn["gamma"] / np.sqrt(bn["moving_variance"] + BN_EPS)
    return ((kernel * scale).astype(np.float32),
            (bn["beta"] - bn["moving_mean"] * scale).astype(np.float32))


def read_keras(path):
    """(alpha, {layer: {kernel, bias}}) from a Keras MobileNet v1 HDF5 file."""
    path = Path(path)
    try:
        f = hdf5.read(path)
    except hdf5.Damaged as e:
        raise WeightsError(f"{e}; download it again from Keras applications") from None
    try:
        return _from_keras(f, path)
    except (ValueError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: damaged Keras file ({type(e).__name__}: {e}); download it again from "
                           "Keras applications") from None


def _from_keras(f, path):
    """read_keras on the file's (attrs, tensors)."""
    stem = _keras_layer(f, path, "conv1")["kernel"]
    if stem.ndim != 4 or stem.shape[:3] != (3, 3, 3):
        raise WeightsError(f"{path}: conv1 kernel has shape {stem.shape}, not (3, 3, 3, C)")
    alpha = stem.shape[3] / STEM
    if alpha not in ALPHAS:
        raise WeightsError(f"{path}: conv1 has {stem.shape[3]} filters, which is no "
                           f"MobileNet v1 width (alphas {ALPHAS})")
    has_head = len(f[0].get("conv_preds", {}).get("weight_names", [])) > 0
    params = {}
    for name, shapes in layer_shapes(alpha, has_head).items():
        w = _keras_layer(f, path, name)
        kernel = w.get("depthwise_kernel", w.get("kernel"))
        if kernel is None:
            raise WeightsError(f"{path}: layer {name} has no kernel")
        want = shapes["kernel"]
        if kernel.size != int(np.prod(want)):
            raise WeightsError(f"{path}: layer {name} has a kernel of shape {kernel.shape}, "
                               f"expected {want} for alpha {alpha}")
        kernel = kernel.reshape(want)
        if name == "conv_preds":
            params[name] = {"kernel": kernel.astype(np.float32),
                            "bias": w["bias"].astype(np.float32)}
            continue
        bn = _keras_layer(f, path, name + "_bn")
        for t in ("gamma", "beta", "moving_mean", "moving_variance"):
            if t not in bn or bn[t].shape != shapes["bias"]:
                raise WeightsError(f"{path}: layer {name}_bn/{t} should have shape "
                                   f"{shapes['bias']}")
        params[name] = dict(zip(("kernel", "bias"), _fold(kernel, bn)))
    return alpha, params


def convert(path, out_dir=None, resolution=None):
    """Convert one Keras file; returns the path of the dsconv file written."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    alpha, params = read_keras(path)
    match = KERAS_NAME.search(path.name)
    if resolution is None:
        resolution = int(match.group(2)) if match else 224
    check_variant(alpha, resolution)
    if match and KERAS_ALPHA[match.group(1)] != alpha:
        warn(f"{path.name} is named for alpha {KERAS_ALPHA[match.group(1)]} but its tensors are alpha {alpha}; "
             f"using {alpha}")
    head = "conv_preds" in params
    out_dir = Path(out_dir) if out_dir else weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"mobilenet_{alpha:g}_{resolution}{'' if head else '_no_top'}.h5"
    files.remove_strays(out_dir)
    attrs = dict(format=FORMAT, alpha=alpha, trained_resolution=resolution, has_head=head,
                 source_file=path.name, source_sha256=sha256(path))
    tensors = {f"{name}/{t}": a for name, ts in params.items() for t, a in ts.items()}

    def fill(f):
        f.attrs.update(attrs, checksum=files.checksum(attrs, tensors))
        for key, a in tensors.items():
            f[key] = a
    files.write_hdf5(out, fill)
    return out


def describe(path):
    """The attributes of a dsconv weight file, or None if it is not one; hdf5.Damaged if it cannot be read."""
    f = hdf5.read(path, datasets=False)[0]["/"]
    if f.get("format") != FORMAT:
        return None
    try:
        return {k: f[k].item() if hasattr(f[k], "item") else f[k]
                for k in ("alpha", "trained_resolution", "has_head", "source_file", "source_sha256")
                if k in f or k != "source_sha256"}
    except KeyError as e:
        raise hdf5.Damaged(f"{path}: damaged weight file (attribute {e} missing)") from None


def _verified(path):
    """{layer: {kernel, bias}} of a dsconv weight file; WeightsError if it fails its checksum."""
    try:
        file_attrs, file_tensors = hdf5.read(path)
    except hdf5.Damaged as e:
        raise WeightsError(str(e)) from None
    attrs = {k: v.item() if hasattr(v, "item") else v for k, v in file_attrs["/"].items() if k != "checksum"}
    stored = file_attrs["/"].get("checksum")
    params = {}
    for key, a in file_tensors.items():
        name, _, t = key.rpartition("/")
        params.setdefault(name, {})[t] = a
    if stored is None:
        raise WeightsError(f"{path}: the weight file carries no checksum (converted by an older dsconv)")
    tensors = {f"{name}/{t}": a for name, ts in params.items() for t, a in ts.items()}
    if stored != files.checksum(attrs, tensors):
        raise WeightsError(f"{path}: the weight file fails its checksum: it was changed after conversion")
    bad = [k for k, a in tensors.items() if not np.all(np.isfinite(a))]
    if bad:
        raise WeightsError(f"{path}: the weight file holds non-finite numbers (in {bad[0]})")
    return params


def _keras_source(info):
    """The Keras file a dsconv file was converted from, if one with the same sha256 is at hand."""
    for k in keras_dirs():
        src = k / info["source_file"]
        if src.is_file() and sha256(src) == info.get("source_sha256"):
            return src
    return None


def _keras_by_name(path):
    """(the Keras file, resolution) that a converted file's name points to, or (None, None)."""
    m = CONVERTED_NAME.fullmatch(path.name)
    if m and float(m.group(1)) in ALPHAS:
        name = keras_file_name(float(m.group(1)), int(m.group(2)), not m.group(3))
        for k in keras_dirs():
            if (k / name).is_file():
                return k / name, int(m.group(2))
    return None, None


def _convert_again(path, error):
    """A converted file whose attributes are damaged, converted again from the Keras file its name points to."""
    src, resolution = _keras_by_name(path)
    if src is None:
        raise WeightsError(f"{error}; convert its Keras file again with "
                           "`python -m dsconv.weights convert PATH/mobilenet_..._tf.h5`") from None
    warn(f"{error}; converting {src} again")
    return convert(src, path.parent, resolution)


def load_file(path, alpha=None, resolution=None):
    """A MobileNet from a dsconv weight file; refuses a file of another alpha.

    A file that fails its checksum is converted again from its Keras file if
    that is at hand (saying so), and refused otherwise.
    """
    path = Path(path)
    try:
        info = describe(path)
    except hdf5.Damaged as e:
        path = _convert_again(path, e)
        info = describe(path)
    if info is None:
        raise WeightsError(f"{path}: not a dsconv weight file; convert Keras files with "
                           f"`python -m dsconv.weights convert {path}`")
    if alpha is not None and info["alpha"] != alpha:
        raise WeightsError(f"{path}: holds alpha {info['alpha']} weights, not the alpha {alpha} "
                           "asked for")
    try:
        params = _verified(path)
    except WeightsError as e:
        src = _keras_source(info)
        if src is None and _keras_by_name(path)[0] is None:
            raise WeightsError(f"{e}; convert the Keras file {info['source_file']} again with "
                               f"`python -m dsconv.weights convert PATH/{info['source_file']}`") from None
        if src is None:  # its record of the source is what was damaged
            path = _convert_again(path, e)
            info = describe(path)
        else:
            warn(f"{e}; converting {src} again")
            path = convert(src, path.parent, info["trained_resolution"])
        params = _verified(path)
    try:
        return MobileNet(info["alpha"], params, resolution or info["trained_resolution"], weights_path=path,
                         weights_sha256=sha256(path), trained_resolution=info["trained_resolution"])
    except DsconvError as e:
        raise WeightsError(f"{e}; convert the Keras file again") from None


def find(alpha, resolution, head=False):
    """The converted file to use for a variant, converting a Keras file on first use."""
    check_variant(alpha, resolution)
    found = {}
    d = weights_dir()
    for path in sorted(d.glob("*.h5")) if d.is_dir() else []:
        try:
            info = describe(path)
        except hdf5.Damaged as e:
            warn(f"{e}; skipping it (delete it, or convert its Keras file again)")
            continue
        if info and info["alpha"] == alpha and (info["has_head"] or not head):
            found.setdefault(info["trained_resolution"], path)
    for res in (resolution, 224):
        if res in found:
            return found[res], res
    for res in (resolution, 224):
        for h in ((True,) if head else (True, False)):
            for k in keras_dirs():
                src = k / keras_file_name(alpha, res, h)
                if src.is_file():
                    note(f"converting {src} -> {d}")
                    return convert(src, d), res
    want = keras_file_name(alpha, resolution, True if head else False)
    raise WeightsError(
        f"no weights for MobileNet {alpha:g}-{resolution}{' with the ImageNet head' if head else ''} "
        f"in {d}. Get Keras' {want}{' (or the 224 one)' if resolution != 224 else ''}, for example with "
        f"keras.applications.MobileNet(alpha={alpha:g}), then run "
        f"`python -m dsconv.weights convert PATH/{want}`, or put it in one of: "
        + ", ".join(str(k) for k in keras_dirs()))


def load(alpha, resolution=224, head=False, quiet=False):
    """The pretrained MobileNet for (alpha, resolution); see find()."""
    path, trained = find(alpha, resolution, head)
    if trained != resolution and not quiet:
        note(f"no {alpha:g}-{resolution} weights; running the {alpha:g}-{trained} ones at {resolution} (the "
             "network is fully convolutional)")
    return load_file(path, alpha, resolution)


def load_recorded(alpha, resolution, head, want, name):
    """The network a model was trained on: the converted file of sha256 ``want`` (named ``name`` then) if present,
    else the variant's weights (load), with a warning if ``want`` is given."""
    d = weights_dir()
    for path in sorted(d.glob("*.h5")) if d.is_dir() else []:
        if sha256(path) != want:  # first: a damaged extra file is then never parsed
            continue
        meta = describe(path)
        if meta and meta["alpha"] == alpha and (meta["has_head"] or not head):
            return load_file(path, alpha, resolution)
    net = load(alpha, resolution, head=head, quiet=True)
    if want and net.weights_sha256 != want:
        warn(f"the model was trained on weights {name} (sha256 {want[:12]}...), which are not in {d}; using "
             f"{net.weights_path.name} instead")
    return net


def _described(path):
    """describe(path), or the error message of a damaged file."""
    try:
        return describe(path)
    except hdf5.Damaged as e:
        return str(e).removeprefix(f"{path}: ")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dsconv.weights", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert Keras MobileNet v1 HDF5 files",
                       formatter_class=HelpFormatter)
    c.add_argument("files", nargs="+", help="Keras files, mobilenet_{1_0,7_5,5_0,2_5}_{224,...}_tf[_no_top].h5")
    c.add_argument("--out", help=f"output folder (default {weights_dir()})")
    c.add_argument("--resolution", type=int,
                   help="resolution the weights were trained at (default: from the file name, else 224)")
    ls = sub.add_parser("list", help="list converted weight files",
                        formatter_class=HelpFormatter)
    ls.add_argument("--dir", help=f"folder to list (default {weights_dir()})")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            for path in args.files:
                out = convert(path, args.out, args.resolution)
                info = describe(out)
                print(f"{path} -> {out}  (alpha {info['alpha']:g}, trained at "
                      f"{info['trained_resolution']}, head {'yes' if info['has_head'] else 'no'})")
        else:
            d = Path(args.dir) if args.dir else weights_dir()
            rows = [(p, _described(p)) for p in sorted(d.glob("*.h5"))] if d.is_dir() else []
            rows = [(p, i) for p, i in rows if i]
            if not rows:
                print(f"no converted weights in {d}; run `python -m dsconv.weights convert KERAS_H5...`")
            for p, i in rows:
                if isinstance(i, str):
                    print(f"{p.name:36s} damaged: {i}; delete it or convert its Keras file again")
                    continue
                print(f"{p.name:36s} alpha {i['alpha']:<5g} trained at {i['trained_resolution']}  "
                      f"head {'yes' if i['has_head'] else 'no '}  from {i['source_file']}")
    except (DsconvError, OSError) as e:
        fail(e)


if __name__ == "__main__":
    main()
