"""Shared fixtures: zoo models exported once, compiled libraries built once per target.

Compiling is the slow part of the suite, so every test that needs a zoo model or a
compiled library asks these session-scoped fixtures instead of building its own.
"""

from __future__ import annotations

import os
import socket

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI replays a fixed set of examples (reproducible runs); locally every run explores anew.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (whole-model) tests")
    config.addinivalue_line("markers", "device: needs the emulated ARM device (qemu-user)")


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def zoo_onnx(artifacts_dir):
    """``zoo_onnx(name)`` -> path of the exported zoo model (exported once)."""
    from npas_tvm.zoo import export_zoo_model

    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = export_zoo_model(name, str(artifacts_dir / f"{name}.onnx"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def compiled(zoo_onnx, artifacts_dir):
    """``compiled(name, target)`` -> (LoadedModel, executable, exported library path)."""
    from npas_tvm.compiler import compile_model, export
    from npas_tvm.model_io import load_onnx
    from npas_tvm.targets import resolve_target

    cache: dict[tuple[str, str], tuple] = {}

    def get(name: str, target: str = "host"):
        key = (name, target)
        if key not in cache:
            spec = resolve_target(target)
            model = load_onnx(zoo_onnx(name))
            executable = compile_model(model, spec)
            path = export(executable, str(artifacts_dir / f"{name}.{target}.so"), spec)
            cache[key] = (model, executable, path)
        return cache[key]

    return get


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def arm_device():
    """(tracker address, device key): a tracker and an emulated aarch64 device (qemu-user)
    on loopback, started once for the session."""
    from npas_tvm.device import start_emulated_arm, start_tracker, stop_started

    tracker = start_tracker("127.0.0.1", free_port())
    key = f"test-arm-{tracker.address.rsplit(':', 1)[1]}"
    try:
        device = start_emulated_arm(tracker.address, key, port=free_port())
    except Exception:
        stop_started(tracker)
        raise
    yield tracker.address, key
    stop_started(device)
    stop_started(tracker)
