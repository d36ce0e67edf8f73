"""The same MobileNet, same weights, in ONNX Runtime and PyTorch: the peers of bench/forward.py.

Both are built from dsconv's table (mobilenet.BLOCKS) and a MobileNet's
folded parameters, up to the pooled features, so their outputs are an
independent check of dsconv's. Each takes NHWC float32 images and returns
(N, F) pooled features.
"""
import numpy as np

from dsconv import kernels, mobilenet


def _pads(size, stride):
    # TensorFlow SAME for a 3x3 window: (before, after)
    out, before = kernels.same_padding(size, stride)
    return before, max((out - 1) * stride + 3 - size, 0) - before


def _convs(net):
    """[(name, OIHW weight, bias, stride, groups, (top, bottom), (left, right))] of the network."""
    p, side = net.params, net.resolution
    out = [("conv1", p["conv1"]["kernel"].transpose(3, 2, 0, 1), p["conv1"]["bias"], 2, 1,
            _pads(side, 2), _pads(side, 2))]
    side = -(-side // 2)
    for i, (_, stride) in enumerate(mobilenet.BLOCKS, 1):
        dw, pw = p[f"conv_dw_{i}"], p[f"conv_pw_{i}"]
        out.append((f"conv_dw_{i}", dw["kernel"].transpose(2, 0, 1)[:, None], dw["bias"], stride,
                    dw["kernel"].shape[2], _pads(side, stride), _pads(side, stride)))
        side = -(-side // stride)
        out.append((f"conv_pw_{i}", pw["kernel"].T[:, :, None, None], pw["bias"], 1, 1, (0, 0), (0, 0)))
    return [(n, np.ascontiguousarray(w), b, s, g, ph, pw) for n, w, b, s, g, ph, pw in out]


def onnx_runtime(net, threads):
    """An ONNX Runtime session of the network (graph built with onnx.helper), as a function."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]
    nodes = [helper.make_node("Transpose", ["images"], ["input"], perm=[0, 3, 1, 2])]
    x = "input"
    for name, w, b, stride, groups, (top, bottom), (left, right) in _convs(net):
        inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                                      kernel_shape=list(w.shape[2:]), strides=[stride, stride],
                                      pads=[top, left, bottom, right], group=groups))
        nodes.append(helper.make_node("Clip", [f"{name}_conv", "zero", "six"], [name]))
        x = name
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["pooled"])]
    r = net.resolution
    graph = helper.make_graph(nodes, "mobilenet_v1",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", r, r, 3])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", net.pooled_width])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["pooled"], {"images": images})[0]


def pytorch(net, threads):
    """The network as a PyTorch module in eager mode, channels-last, as a function."""
    import torch

    torch.set_num_threads(threads)
    layers = []
    for _, w, b, stride, groups, (top, bottom), (left, right) in _convs(net):
        conv = torch.nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[2], stride, groups=groups)
        conv.weight.data, conv.bias.data = torch.from_numpy(w), torch.from_numpy(b)
        if top == bottom and left == right:
            conv.padding = (top, left)
        else:
            layers.append(torch.nn.ZeroPad2d((left, right, top, bottom)))
        layers += [conv, torch.nn.ReLU6()]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = model.eval().to(memory_format=torch.channels_last)

    def run(images):
        with torch.inference_mode():  # NHWC images are NCHW in channels-last strides: no copy
            return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    return run
