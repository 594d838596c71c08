"""The emulated ARM device over TVM RPC: arm-cpu artifacts run and match onnxruntime.

Uses the session's tracker and emulated aarch64 device (qemu-user; tests/conftest.py);
deselect with ``-m "not device"`` where qemu-user is not installed.
"""

from __future__ import annotations

import pytest
from conftest import free_port

from npas_tvm.cli import main

pytestmark = pytest.mark.device


def test_arm_cpu_model_runs_remotely_and_matches(arm_device, compiled, capsys):
    tracker, key = arm_device
    model, _, library = compiled("vgg_cifar", "arm-cpu")
    code = main(["bench", library, "--model", model.path, "--rpc-tracker", tracker,
                 "--rpc-key", key, "--number", "1", "--repeat", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "check vs onnxruntime" in out and ": OK" in out


@pytest.mark.parametrize("plan", ["rule", "uniform5", "family"])
def test_npas_model_runs_remotely_and_matches_the_pruned_onnx(arm_device, zoo_onnx, tmp_path,
                                                              capsys, plan):
    """compile --npas for arm-cpu (block, pattern or filter kernels as the plan says),
    run over RPC on the emulated phone, checked against onnxruntime on the pruned ONNX."""
    npas = ["--npas", "rule"]
    if plan == "family":  # patterns on the 3x3 convs (the entry form), UBP on the FCs
        import json

        import onnx

        layers = {}
        for init in onnx.load(zoo_onnx("vgg_cifar")).graph.initializer:
            if len(init.dims) == 4 and tuple(init.dims[2:]) == (3, 3) and init.dims[1] > 3:
                layers[init.name] = {"scheme": "pattern", "rate": 3}
            elif len(init.dims) == 2:
                layers[init.name] = {"scheme": "unaligned_block", "rate": 3, "block": [4, 1]}
        path = tmp_path / "plan.json"
        path.write_text(json.dumps({"format": "npas-plan", "version": 1, "layers": layers}))
        npas = ["--npas", str(path)]
    elif plan != "rule":
        from npas_tvm.layers import load_model_layers
        from npas_tvm.plan import save_plan
        from npas_tvm.targets import resolve_target
        from search.rule_mapper import RuleTarget, uniform_plan

        _, layers = load_model_layers(zoo_onnx("vgg_cifar"))
        path = save_plan(uniform_plan(layers, 5.0, RuleTarget.for_spec(
            resolve_target("arm-cpu"))), str(tmp_path / "plan.json"))
        npas = ["--npas", path]
    out = _compile_and_run_remotely(zoo_onnx("vgg_cifar"), npas, tmp_path / f"vgg.{plan}.arm.so",
                                    arm_device, capsys)
    assert ("pattern" in out and "unaligned_" in out) if plan == "family" else "gathered" in out


def test_ubp_ring_runs_remotely_and_matches(arm_device, tmp_path, capsys):
    """UBP 1x1 convs in the ring kernel (4 x 1, and 8 x 1 on NEON's 32 registers, with
    a fused relu and residual add), compiled for arm-cpu and run on the emulated phone."""
    import json

    from onnx_graphs import make_graph

    g = make_graph((1, 16, 10, 10))
    skip = g.conv(32, kernel=1)
    g.op("Relu")
    g.conv(32, kernel=1)
    g.op("Add", skip)
    model = g.save(tmp_path / "ubp.onnx")
    layers = {"conv1.weight": {"scheme": "unaligned_block", "rate": 3, "block": [4, 1]},
              "conv2.weight": {"scheme": "unaligned_block", "rate": 3, "block": [8, 1]}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "npas-plan", "version": 1, "layers": layers}))
    out = _compile_and_run_remotely(model, ["--npas", str(path)], tmp_path / "ubp.arm.so",
                                    arm_device, capsys)
    assert out.count("unaligned_ring") == 2, out


def _compile_and_run_remotely(model: str, npas: list, library, arm_device, capsys) -> str:
    """``compile`` for arm-cpu with ``npas``, then ``bench`` over RPC with its check
    against onnxruntime on the pruned ONNX; returns the compile's output."""
    tracker, key = arm_device
    library = str(library)
    assert main(["compile", model, "--target", "arm-cpu", *npas, "-o", library]) == 0
    compiled = capsys.readouterr().out
    code = main(["bench", library, "--model", library.replace(".so", ".pruned.onnx"),
                 "--rpc-tracker", tracker, "--rpc-key", key, "--number", "1",
                 "--repeat", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "check vs onnxruntime" in out and ": OK" in out
    return compiled


def test_wrong_key_fails_fast(arm_device, compiled, capsys):
    tracker, _ = arm_device
    _, _, library = compiled("vgg_cifar", "arm-cpu")
    code = main(["bench", library, "--input-shape", "input=1,3,32,32",
                 "--rpc-tracker", tracker, "--rpc-key", "no-such-phone"])
    err = capsys.readouterr().err
    assert code == 2 and "no device with key 'no-such-phone'" in err


def test_unreachable_tracker_fails_fast(compiled, capsys):
    _, _, library = compiled("vgg_cifar", "arm-cpu")
    code = main(["bench", library, "--input-shape", "input=1,3,32,32",
                 "--rpc-tracker", f"127.0.0.1:{free_port()}", "--rpc-key", "x"])
    assert code == 2 and "cannot reach the RPC tracker" in capsys.readouterr().err


def test_servers_bind_loopback_unless_told():
    from npas_tvm.device import DeviceError, check_bind_host

    check_bind_host("127.0.0.1", explicit=False)
    check_bind_host("::1", explicit=False)
    with pytest.raises(DeviceError, match="only loopback"):
        check_bind_host("0.0.0.0", explicit=False)
    check_bind_host("0.0.0.0", explicit=True)  # the user asked for it
