"""The network against Keras' own outputs, and the paper's Table 3."""
import threading

import h5py
import numba
import numpy as np
import pytest

from dsconv import DsconvError, kernels, mobilenet, weights
from dsconv.paper import TABLE3, TABLE3_ERRATA
from tests.conftest import REFERENCE

@pytest.mark.parametrize("variant", sorted(TABLE3))
def test_table3(variant):
    madds, params = mobilenet.count(*variant)
    paper_madds, paper_params = TABLE3[variant]
    assert abs(params / 1e6 - paper_params) <= 0.005, params
    if variant in TABLE3_ERRATA:
        assert round(madds / 1e6) == TABLE3_ERRATA[variant]
    else:
        assert abs(madds / 1e6 - paper_madds) <= 0.5 + 1e-9, madds


def test_table3_keras_parameter_count():
    # Keras' MobileNet(alpha=1.0) summary: 4,253,864 parameters, which counts
    # gamma too; ours counts the checkpoint without it.
    _, params = mobilenet.count(1.0, 224)
    shapes = mobilenet.layer_shapes(1.0)
    bn_channels = sum(t["bias"][0] for n, t in shapes.items() if n != "conv_preds")
    assert params + bn_channels == 4_253_864


def test_variant_checks():
    with pytest.raises(DsconvError, match="alpha"):
        mobilenet.check_variant(0.6, 224)
    with pytest.raises(DsconvError, match="multiple of 32"):
        mobilenet.check_variant(1.0, 100)


CASES = [(a, r) for a in (0.25, 0.75, 1.0) for r in (224, 160, 128)]


@pytest.fixture(scope="module")
def reference():
    with h5py.File(REFERENCE, "r") as f:
        yield f


def largest(got, want):
    return float(np.abs(got.astype(np.float64) - want).max())


@pytest.mark.parametrize("alpha,resolution", CASES)
def test_forward_matches_keras(converted, reference, alpha, resolution):
    net = weights.load(alpha, resolution, head=True, quiet=True)
    ref = reference[f"alpha_{alpha}/res_{resolution}"]
    pooled, logits = net.forward(ref["input"][()])
    dp, dl = largest(pooled, ref["pooled"][()]), largest(logits, ref["logits"][()])
    print(f"MobileNet {alpha}-{resolution}: pooled {dp:.3g}, logits {dl:.3g}")
    assert dp <= 1e-4, f"pooled features differ from Keras by up to {dp:.3g}"
    assert dl <= 1e-4, f"logits differ from Keras by up to {dl:.3g}"
    assert np.array_equal(np.argsort(-logits, axis=1)[:, :5], ref["top5"][()])


@pytest.mark.parametrize("alpha", [0.25, 0.75, 1.0])
def test_activations_match_keras(converted, reference, alpha):
    net = weights.load(alpha, 224, quiet=True)
    ref = reference[f"alpha_{alpha}/res_224"]
    stored = ref["activations_image0"]
    seen = set()
    for name, x in net.layers(ref["input"][:1]):
        if name in stored:
            want = stored[name][()]
            d = largest(x[0], want)
            # float32 error grows with the values: 1e-4 of the layer's range
            tol = 1e-4 * max(1.0, float(np.abs(want).max()))
            print(f"{name}: {d:.3g} (tolerance {tol:.3g})")
            assert d <= tol, f"{name} differs from Keras by up to {d:.3g}"
            seen.add(name)
    assert seen == set(stored), set(stored) - seen


def test_forward_without_head(converted, reference):
    net = weights.load(0.25, 128, head=False, quiet=True)
    ref = reference["alpha_0.25/res_128"]
    pooled, _ = net.forward(ref["input"][()])
    assert largest(pooled, ref["pooled"][()]) <= 1e-4


def test_forward_rejects_wrong_size(converted):
    net = weights.load(0.25, 128, quiet=True)
    with pytest.raises(ValueError, match="128, 128, 3"):
        net.forward(np.zeros((1, 224, 224, 3), np.float32))


def test_runs_at_other_multiples_of_32(converted):
    net = weights.load(0.25, 96, quiet=True)
    pooled, _ = net.forward(np.zeros((2, 96, 96, 3), np.float32))
    assert pooled.shape == (2, 256)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, numba.config.NUMBA_NUM_THREADS])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fused_forward_matches_layer_by_layer(converted, n, threads):
    # forward() runs whole images per thread, then the remainder shared by the
    # threads layer by layer; both must give what the simple
    # one-kernel-per-layer path gives.
    net = weights.load(0.25, 128, quiet=True)
    x = np.random.default_rng(n).uniform(-1, 1, (n, 128, 128, 3)).astype(np.float32)
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        pooled, _ = net.forward(x)
    finally:
        numba.set_num_threads(before)
    want = net.feature_maps(x).astype(np.float64).mean(axis=(1, 2))
    assert largest(pooled, want) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("alpha,resolution", [(0.25, 128), (1.0, 224)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_fused_pass_is_the_same_whoever_computes_what(converted, alpha, resolution, threads, n):
    # Any split of the work between threads, stacks and shared layers (1.0-224
    # splits its shared layers into many row and channel tasks), more threads
    # than cores included, gives each image the feature maps of the
    # layer-by-layer path, bit for bit, and the same pooled features as the
    # image alone.
    net = weights.load(alpha, resolution, quiet=True)
    x = np.random.default_rng(n).uniform(-1, 1, (n, resolution, resolution, 3)).astype(np.float32)
    packed = net.packed
    side = resolution // 32
    pooled = np.empty((n, net.pooled_width), np.float32)
    maps = np.empty((n, side, side, net.pooled_width), np.float32)
    kernels.network(x, packed, kernels.network_buffers(packed, resolution, threads), pooled, maps)
    want = net.feature_maps(x)
    np.testing.assert_array_equal(maps, want)
    assert largest(pooled, want.astype(np.float64).mean(axis=(1, 2))) <= 1e-5
    alone = np.concatenate([net.forward(x[i:i + 1])[0] for i in range(n)])
    np.testing.assert_array_equal(pooled, alone)
    np.testing.assert_array_equal(net.forward_maps(x)[1], maps)


def test_fused_pass_completes_on_one_thread_of_several(converted):
    # The threads claim the work as they come: run only thread 0's part of a
    # pass laid out for 3 threads (as if the others never started), and it
    # does all of it.
    net = weights.load(0.25, 128, quiet=True)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 128, 128, 3)).astype(np.float32)
    packed = net.packed
    b = kernels.network_buffers(packed, 128, 3)
    pooled = np.full((5, net.pooled_width), np.nan, np.float32)
    mail = np.zeros(kernels.MAIL, np.int64)
    kernels._post(mail, 3, x, 5, 128, b.stack, *packed, b.act, b.tile, pooled, kernels._NO_MAPS, b.counters)
    kernels._passes(0, mail, 0)
    np.testing.assert_array_equal(pooled, net.forward(x)[0])


def test_fused_passes_from_several_threads_take_turns(converted):
    # The helper threads serve one pass at a time: networks called from
    # several Python threads at once (the page, a script's own threads), with
    # 2 and 3 threads per pass in turn, each get what they get alone.
    nets = [weights.load(0.25, 128, quiet=True), weights.load(0.25, 160, quiet=True)]
    xs = [np.random.default_rng(i).uniform(-1, 1, (n, net.resolution, net.resolution, 3)).astype(np.float32)
          for i, (net, n) in enumerate(zip(nets, (1, 3)))]
    want = [net.forward(x)[0] for net, x in zip(nets, xs)]
    got, errors = [[] for _ in nets], []

    def work(i):
        try:
            net, x = nets[i], xs[i]
            pooled = np.empty((len(x), net.pooled_width), np.float32)
            for k in range(30):
                buffers = kernels.network_buffers(net.packed, net.resolution, 2 + (k + i) % 2)
                kernels.network(x, net.packed, buffers, pooled)
                got[i].append(pooled.copy())
        except Exception as e:  # reported below: an assertion in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(nets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a pass did not finish"
    assert not errors
    for g, w in zip(got, want):
        assert len(g) == 30
        for pooled in g:
            np.testing.assert_array_equal(pooled, w)


def test_fused_pass_refuses_arrays_it_would_misread(converted):
    # The threads read the arrays by address: a wrong shape, dtype or layout, or buffers made for other
    # weights, is a clear error before the pass, not memory read or written out of bounds.
    net, other = weights.load(0.25, 128, quiet=True), weights.load(0.25, 160, quiet=True)
    b = kernels.network_buffers(net.packed, 128, 2)
    x = np.zeros((2, 128, 128, 3), np.float32)
    pooled = np.empty((2, net.pooled_width), np.float32)
    bad = [(np.zeros((2, 160, 160, 3), np.float32), net.packed, b, pooled, None, "images"),
           (x.astype(np.float64), net.packed, b, pooled, None, "images"),
           (np.zeros((2, 128, 128, 6), np.float32)[..., :3], net.packed, b, pooled, None, "images"),
           (x, net.packed, b, pooled[:1], None, "pooled"),
           (x, net.packed, b, pooled, np.empty((2, 5, 5, net.pooled_width), np.float32), "maps"),
           (x, other.packed, b, pooled, None, "other weights")]
    for args in bad:
        with pytest.raises(ValueError, match=args[-1]):
            kernels.network(*args[:-1])
    kernels.network(x, net.packed, b, pooled, np.empty((2, 4, 4, net.pooled_width), np.float32))
    np.testing.assert_array_equal(pooled, net.forward(x)[0])
