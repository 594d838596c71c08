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
