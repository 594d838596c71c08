"""An emulated ARM phone and a TVM RPC tracker, on loopback.

A phone runs TVM's RPC app registered with a tracker; here the "phone" is an aarch64
Python with the TVM runtime under ``qemu-user``, serving TVM's RPC server, so the whole
flow (tracker, upload, remote run, meta_schedule's RPC runner) is the real one. Timings
under emulation mean nothing; correctness does.

The aarch64 root is assembled once and cached (Debian arm64 packages + aarch64 wheels
with the host's TVM pins), under ``$NPAS_TVM_CACHE`` (default ``~/.cache/npas-tvm``).
Started servers are recorded as JSON files so that ``stop`` finds them again.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from npas_tvm.errors import NpasError

DEBIAN_ARM64_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                         "libc6", "libstdc++6", "libgcc-s1", "libexpat1", "zlib1g", "libffi8")
ARM64_WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy",
                "ml_dtypes", "typing_extensions", "cloudpickle", "psutil")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_17_aarch64", "manylinux2014_aarch64")
ROOT_LAYOUT_VERSION = "1"


class DeviceError(NpasError):
    """The emulated device or the tracker cannot be prepared, started or reached."""


def cache_dir() -> Path:
    return Path(os.environ.get("NPAS_TVM_CACHE", Path.home() / ".cache" / "npas-tvm"))


def state_dir() -> Path:
    path = cache_dir() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_bind_host(host: str, explicit: bool) -> None:
    """Servers bind loopback only, unless the user asked for another address."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise DeviceError(f"--host {host!r}: not an IP address") from None
    if not loopback and not explicit:
        raise DeviceError(f"refusing to bind {host}: only loopback unless --host is given")


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeviceError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


# ------------------------------------------------------------------ the aarch64 root


def arm_root() -> Path:
    return cache_dir() / "arm64-root"


def _run(cmd: list[str], what: str, cwd: str | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise DeviceError(f"{what} failed: {tail[0]}")


def prepare_arm_root(log=print) -> Path:
    """Assemble (once) an aarch64 Python 3.11 with TVM's runtime, for qemu-aarch64."""
    root = arm_root()
    marker = root / ".npas-ready"
    if marker.exists() and marker.read_text() == ROOT_LAYOUT_VERSION:
        return root
    for tool, package in (("qemu-aarch64", "qemu-user"), ("apt-get", "apt"),
                          ("dpkg", "dpkg")):
        if not _which(tool):
            raise DeviceError(f"{tool} not found: install Debian's {package} (bash .ci/setup)")
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                             text=True).stdout.split()
    if "arm64" not in foreign:
        raise DeviceError("Debian's arm64 architecture is not enabled: run `sudo dpkg "
                          "--add-architecture arm64 && sudo apt-get update` (bash .ci/setup)")
    start = time.perf_counter()
    log(f"preparing the aarch64 root in {root} (once; about 120 MB)...")
    cache_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="arm64-root-", dir=cache_dir()))
    with tempfile.TemporaryDirectory() as downloads:
        _run(["apt-get", "download", "-q", *[f"{p}:arm64" for p in DEBIAN_ARM64_PACKAGES]],
             "apt-get download of the arm64 packages", cwd=downloads)
        for deb in sorted(Path(downloads).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(staging)], f"unpacking {deb.name}")
        wheels = Path(downloads) / "wheels"
        platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
              "--python-version", "3.11", "--implementation", "cp", *platforms,
              "-d", str(wheels), *ARM64_WHEELS], "pip download of the aarch64 wheels")
        site = staging / "usr" / "lib" / "python3" / "dist-packages"
        site.mkdir(parents=True, exist_ok=True)
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
    _write_launchers(staging, root)
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    staging.rename(root)
    (root / ".npas-ready").write_text(ROOT_LAYOUT_VERSION)
    log(f"aarch64 root ready in {time.perf_counter() - start:.0f} s")
    return root


def _write_launchers(staging: Path, root: Path) -> None:
    """``python-aarch64``: runs the emulated Python; ``rpc_launcher.py``: TVM's server.

    TVM's RPC server starts its worker by exec'ing ``sys.executable``; without binfmt
    that must be the qemu wrapper, so the launcher sets it before running the server.
    """
    wrapper = staging / "python-aarch64"
    wrapper.write_text(f'#!/bin/sh\nexec qemu-aarch64 -L "{root}" "{root}/usr/bin/python3.11" '
                       '"$@"\n')
    wrapper.chmod(0o755)
    (staging / "rpc_launcher.py").write_text(
        "import runpy, sys\n"
        f"sys.executable = {str(root / 'python-aarch64')!r}\n"
        "runpy.run_module('tvm.exec.rpc_server', run_name='__main__', alter_sys=True)\n")


def _which(tool: str) -> bool:
    from shutil import which

    return which(tool) is not None


# ------------------------------------------------------------------ started servers


@dataclass
class Started:
    """A background server we started: enough to report on it and stop it."""

    kind: str  # "tracker" or "arm-device"
    name: str  # the tracker's address or the device key
    pid: int
    log: str
    address: str

    @property
    def state_file(self) -> Path:
        safe = self.name.replace(":", "_").replace("/", "_")
        return state_dir() / f"{self.kind}-{safe}.json"

    def save(self) -> None:
        self.state_file.write_text(json.dumps(asdict(self)))

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True


def _spawn(kind: str, name: str, cmd: list[str], address: str):
    log_path = state_dir() / f"{kind}-{name.replace(':', '_')}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    started = Started(kind, name, proc.pid, str(log_path), address)
    started.save()
    return started, proc


def _wait_for_log(started: Started, proc: subprocess.Popen, needle: str,
                  timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = Path(started.log).read_text(errors="replace")
        if needle in text:
            return
        if proc.poll() is not None:  # exited (an unreaped child still answers kill 0)
            last = text.strip().splitlines()[-1:] or ["(empty log)"]
            stop_started(started)
            raise DeviceError(f"{started.kind} exited during start-up: {last[0]} "
                              f"(log: {started.log})")
        time.sleep(0.5)
    stop_started(started)
    raise DeviceError(f"{started.kind} did not come up within {timeout_s:.0f} s "
                      f"(log: {started.log})")


def start_tracker(host: str = "127.0.0.1", port: int = 9190) -> Started:
    """TVM's RPC tracker on ``host:port`` (ports up to port+9 are tried)."""
    cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
           "--port-end", str(port + 10)]
    started, proc = _spawn("tracker", f"{host}:{port}", cmd, f"{host}:{port}")
    _wait_for_log(started, proc, "bind to", 60)
    bound = Path(started.log).read_text().split("bind to")[-1].split()[0]
    started.address = bound.strip()
    started.save()
    return started


def start_emulated_arm(tracker: str, key: str, host: str = "127.0.0.1", port: int = 9091,
                       log=print) -> Started:
    """The emulated ARM device, registered with ``tracker`` under ``key``."""
    parse_address(tracker, "--tracker")
    root = prepare_arm_root(log)
    cmd = [str(root / "python-aarch64"), str(root / "rpc_launcher.py"), "--host", host,
           "--port", str(port), "--port-end", str(port + 100), "--tracker", tracker,
           "--key", key]
    started, proc = _spawn("arm-device", key, cmd, tracker)
    _wait_for_log(started, proc, "bind to", 300)  # importing TVM under qemu takes 15-60 s
    wait_for_key(tracker, key, timeout_s=60)
    return started


def find_started(kind: str | None = None) -> list[Started]:
    found = []
    for path in sorted(state_dir().glob("*.json")):
        started = Started(**json.loads(path.read_text()))
        if kind is None or started.kind == kind:
            found.append(started)
    return found


def stop_started(started: Started) -> None:
    """Stop a server and its worker children (one process group), then forget it."""
    try:
        os.killpg(started.pid, signal.SIGTERM)
        for _ in range(20):
            if not started.alive():
                break
            time.sleep(0.1)
        else:
            os.killpg(started.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    started.state_file.unlink(missing_ok=True)


# ------------------------------------------------------------------ talking to devices


def tracker_keys(tracker: str, timeout_s: float = 5.0) -> dict[str, int]:
    """Free devices per key registered at ``tracker``; fails fast when unreachable."""
    import socket

    from tvm import rpc

    host, port = parse_address(tracker, "--rpc-tracker")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        summary = rpc.connect_tracker(host, port).summary()
    except (OSError, RuntimeError) as err:
        raise DeviceError(f"cannot reach the RPC tracker at {tracker}: {err}") from None
    keys: dict[str, int] = {}
    for entry in summary.get("server_info", []):
        key = entry.get("key", "")
        key = key.split(":", 1)[1] if key.startswith("server:") else key
        keys[key] = keys.get(key, 0) + 1
    return keys


def wait_for_key(tracker: str, key: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if key in tracker_keys(tracker):
            return
        time.sleep(1.0)
    raise DeviceError(f"no device registered as {key!r} at {tracker} after {timeout_s:.0f} s")


def request_session(tracker: str, key: str, session_timeout_s: int = 600):
    """An RPC session on a device; a wrong key fails at once, naming the keys present."""
    from tvm import rpc

    keys = tracker_keys(tracker)
    if key not in keys:
        present = ", ".join(sorted(keys)) or "none"
        raise DeviceError(f"no device with key {key!r} at tracker {tracker} "
                          f"(registered keys: {present})")
    host, port = parse_address(tracker, "--rpc-tracker")
    return rpc.connect_tracker(host, port).request(key, priority=1,
                                                   session_timeout=session_timeout_s)
