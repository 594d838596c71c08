"""NPAS phase 1: the torch replacement of mobile-unfriendly activations and the Relax pass
that does the same in the compiled graph (checked against numpy on TVM's llvm build)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from relay_passes import ReplaceMobileUnfriendlyOps

torch = pytest.importorskip("torch")

from search.replace_ops import Replacement, replace_mobile_unfriendly  # noqa: E402


def np_hardswish(x):
    return x * np.clip(x + 3, 0, 6) / 6


def np_hardsigmoid(x):
    return np.clip(x / 6 + 0.5, 0, 1)


# ---------------------------------------------------------------- torch


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = torch.nn.SiLU()
        self.gate = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 8, 1),
                                        torch.nn.Sigmoid())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 4),
                                        torch.nn.GELU(), torch.nn.Mish())

    def forward(self, x):
        x = self.act(self.conv(x))
        x = x * self.gate(x)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1))


def test_torch_replacement_swaps_the_modules():
    model, replaced = replace_mobile_unfriendly(_Net())
    assert replaced == [Replacement("act", "SiLU", "Hardswish"),
                        Replacement("gate.2", "Sigmoid", "Hardsigmoid"),
                        Replacement("head.2", "GELU", "ReLU"),
                        Replacement("head.3", "Mish", "Hardswish")]
    kinds = {type(m).__name__ for m in model.modules()}
    assert not kinds & {"SiLU", "Sigmoid", "GELU", "Mish"}
    _, again = replace_mobile_unfriendly(model)
    assert again == []
    _, smooth = replace_mobile_unfriendly(_Net(), gelu="hardswish")
    assert Replacement("head.2", "GELU", "Hardswish") in smooth


def test_torch_replacements_stay_close():
    x = torch.linspace(-8, 8, 1601)
    assert float((torch.nn.Hardswish()(x) - torch.nn.SiLU()(x)).abs().max()) < 0.15
    assert float((torch.nn.Hardsigmoid()(x) - torch.nn.Sigmoid()(x)).abs().max()) < 0.1
    assert float((torch.relu(x) - torch.nn.GELU()(x)).abs().max()) < 0.2
    np.testing.assert_allclose(torch.nn.Hardswish()(x).numpy(), np_hardswish(x.numpy()),
                               atol=1e-6)
    np.testing.assert_allclose(torch.nn.Hardsigmoid()(x).numpy(), np_hardsigmoid(x.numpy()),
                               atol=1e-6)
    # A whole model: same ranking of classes on most inputs after the swap.
    torch.manual_seed(0)
    model = _Net().eval()
    inputs = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        before = model(inputs)
        after = replace_mobile_unfriendly(model)[0](inputs)
    assert float((after - before).abs().max()) < 0.2


def test_zoo_models_have_nothing_to_replace():
    from npas_tvm.zoo import build_model

    for name in ("mobilenet_v2", "mobilenet_v3_large", "vgg_cifar"):
        assert replace_mobile_unfriendly(build_model(name))[1] == []


# ---------------------------------------------------------------- Relax


def _elementwise_onnx():
    """y1 = x * sigmoid(x) (swish as ONNX exports SiLU), y2 = sigmoid(x) * x (other
    order), y3 = sigmoid(2 x) (a plain sigmoid)."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Mul", ["x", "s"], ["y1"]),
             helper.make_node("Mul", ["s", "x"], ["y2"]),
             helper.make_node("Add", ["x", "x"], ["x2"]),
             helper.make_node("Sigmoid", ["x2"], ["y3"])]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT,  # noqa: E731
                                                       [2, 3, 8, 9])
    graph = helper.make_graph(nodes, "acts", [value("x")], [value("y1"), value("y2"),
                                                            value("y3")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(mod, *inputs):
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return [o.numpy() for o in out] if isinstance(out, (list, tuple, tvm.ir.Array)) \
        else [out.numpy()]


def _ops(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: names.append(e.op.name)
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


def test_relax_pass_rewrites_swish_and_sigmoid_and_matches_numpy():
    mod = from_onnx(_elementwise_onnx())
    replace = ReplaceMobileUnfriendlyOps()
    rewritten = replace(mod)
    assert "relax.sigmoid" not in _ops(rewritten)
    assert replace.replaced == {"hardswish": 2, "hardsigmoid": 1}
    x = np.linspace(-8, 8, 2 * 3 * 8 * 9, dtype="float32").reshape(2, 3, 8, 9)
    y1, y2, y3 = _run(rewritten, x)
    np.testing.assert_allclose(y1, np_hardswish(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y2, np_hardswish(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y3, np_hardsigmoid(2 * x), rtol=1e-5, atol=1e-6)
    dense1, _, dense3 = _run(mod, x)  # before the pass: the exact functions
    np.testing.assert_allclose(dense1, x / (1 + np.exp(-x)), rtol=1e-4, atol=1e-5)
    assert np.abs(y3 - dense3).max() < 0.1


def test_relax_pass_keeps_gates_when_asked_and_rewrites_silu():
    mod = from_onnx(_elementwise_onnx())
    kept = ReplaceMobileUnfriendlyOps(sigmoid=False)(mod)
    assert _ops(kept).count("relax.sigmoid") == 1  # y3's gate stays, the swishes go

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 16), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            out = builder.emit_output(relax.op.nn.silu(x))
        builder.emit_func_output(out)
    silu = builder.get()
    rewritten = ReplaceMobileUnfriendlyOps()(silu)
    assert "relax.nn.silu" not in _ops(rewritten)
    data = np.linspace(-5, 5, 64, dtype="float32").reshape(4, 16)
    np.testing.assert_allclose(_run(rewritten, data)[0], np_hardswish(data), rtol=1e-5,
                               atol=1e-6)


def test_relax_pass_matches_the_torch_replacement_on_a_conv_model(tmp_path):
    """The compiled, rewritten model equals the torch model after
    ``replace_mobile_unfriendly`` (the search fine-tunes the second, compiles the first).
    The head's GELU and Mish are dropped: the pass rewrites swish, SiLU and sigmoid only."""
    import onnx

    from npas_tvm.zoo import export_onnx

    torch.manual_seed(1)
    model = _Net().eval()
    model.head = torch.nn.Sequential(torch.nn.Flatten(), model.head[1])
    path = export_onnx(model, str(tmp_path / "net.onnx"), (1, 3, 8, 8))
    rewritten = ReplaceMobileUnfriendlyOps()(from_onnx(onnx.load(path)))
    assert "relax.sigmoid" not in _ops(rewritten)
    x = torch.randn(1, 3, 8, 8)
    swapped, replaced = replace_mobile_unfriendly(model)
    assert len(replaced) == 2
    with torch.no_grad():
        expected = swapped(x).numpy()
    np.testing.assert_allclose(_run(rewritten, x.numpy())[0], expected, rtol=1e-4, atol=1e-5)
