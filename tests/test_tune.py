"""``npas-tvm tune`` and ``compile --tuning-db``: records written, applied, resumed; RPC
tuning on the emulated ARM device, losing it mid-run, and bad device arguments.

The local tests tune a two-conv graph with a few trials; the device tests (marker
``device``) measure on the emulated aarch64 device, where each trial takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import free_port
from onnx_graphs import make_graph

from npas_tvm.cli import main


def _two_convs(path) -> str:
    g = make_graph((1, 16, 14, 14))
    g.conv(32)
    g.op("Relu")
    g.conv(32)
    g.op("Relu")
    return g.save(path)


def _records(work_dir) -> int:
    path = os.path.join(work_dir, "database_tuning_record.json")
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as records:
        return sum(1 for line in records if line.strip())


def _measured(out: str) -> tuple[int, int]:
    found = re.search(r"measured (\d+) new candidates \((\d+) already", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model path, work dir) after a 2-trial local tuning run."""
    folder = tmp_path_factory.mktemp("tune")
    model = _two_convs(folder / "convs.onnx")
    work_dir = str(folder / "db")
    assert main(["tune", model, "--work-dir", work_dir, "--trials", "2", "--no-progress"]) == 0
    return model, work_dir


def test_local_tuning_writes_records_that_compile_applies(tuned, tmp_path, capsys):
    model, work_dir = tuned
    assert _records(work_dir) == 2
    capsys.readouterr()
    code = main(["compile", model, "--target", "host", "-o", str(tmp_path / "m.so"),
                 "--tuning-db", work_dir, "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    applied = re.search(r"tuned schedules for (\d+) of \d+ kernels", out)
    assert applied and int(applied.group(1)) == 2, out
    assert ": OK" in out


def test_rerun_measures_only_what_is_new(tuned, tmp_path, capsys):
    model, first = tuned
    work_dir = str(tmp_path / "db")
    shutil.copytree(first, work_dir)
    capsys.readouterr()
    assert main(["tune", model, "--work-dir", work_dir, "--trials", "5", "--no-progress"]) == 0
    new, reused = _measured(capsys.readouterr().out)
    assert (new, reused) == (3, 2)
    assert _records(work_dir) == 5
    assert main(["tune", model, "--work-dir", work_dir, "--trials", "5", "--no-progress"]) == 0
    assert _measured(capsys.readouterr().out) == (0, 5)
    assert _records(work_dir) == 5


def test_tuning_db_must_exist(tuned, tmp_path, capsys):
    model, _ = tuned
    code = main(["compile", model, "-o", str(tmp_path / "m.so"), "--tuning-db",
                 str(tmp_path / "nothing")])
    assert code == 2 and "not a tuning database" in capsys.readouterr().err


def test_unreachable_tracker_fails_fast(tuned, capsys):
    model, _ = tuned
    start = time.monotonic()
    code = main(["tune", model, "--work-dir", "unused", "--rpc-tracker",
                 f"127.0.0.1:{free_port()}", "--rpc-key", "x"])
    assert code == 2 and "cannot reach the RPC tracker" in capsys.readouterr().err
    assert time.monotonic() - start < 10


@pytest.mark.device
def test_wrong_key_fails_fast(arm_device, tuned, capsys):
    tracker, _ = arm_device
    model, _ = tuned
    start = time.monotonic()
    code = main(["tune", model, "--target", "arm-cpu", "--work-dir", "unused",
                 "--rpc-tracker", tracker, "--rpc-key", "no-such-phone"])
    assert code == 2 and "no device with key 'no-such-phone'" in capsys.readouterr().err
    assert time.monotonic() - start < 10


@pytest.mark.device
def test_rpc_tuning_writes_records_that_compile_applies(arm_device, tuned, tmp_path, capsys):
    tracker, key = arm_device
    model, _ = tuned
    work_dir = str(tmp_path / "db")
    assert main(["tune", model, "--target", "arm-cpu", "--work-dir", work_dir, "--trials", "2",
                 "--rpc-tracker", tracker, "--rpc-key", key, "--no-progress"]) == 0
    assert _records(work_dir) == 2
    with open(os.path.join(work_dir, "database_tuning_record.json"), encoding="utf-8") as f:
        runs = [json.loads(line)[1][1] for line in f if line.strip()]
    assert all(run and run[0] < 1e9 for run in runs), runs  # measured on the device
    capsys.readouterr()
    assert main(["compile", model, "--target", "arm-cpu", "-o", str(tmp_path / "m.so"),
                 "--tuning-db", work_dir]) == 0
    assert "tuned schedules for 2 of" in capsys.readouterr().out
    # the host compile has no record for its own target
    assert main(["compile", model, "--target", "host", "-o", str(tmp_path / "h.so"),
                 "--tuning-db", work_dir]) == 0
    assert "tuned schedules for 0 of" in capsys.readouterr().out


@pytest.mark.device
def test_device_lost_mid_run_keeps_what_was_measured(arm_device, tuned, tmp_path):
    """A second emulated device, killed once the first result is in: the run retries,
    then ends (exit 0) saying so, and the database keeps every record made."""
    from npas_tvm.device import start_emulated_arm, stop_started

    tracker, _ = arm_device
    model, _ = tuned
    key = f"doomed-{free_port()}"
    device = start_emulated_arm(tracker, key, port=free_port())
    work_dir = str(tmp_path / "db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "npas_tvm", "tune", model, "--target", "arm-cpu",
         "--work-dir", work_dir, "--trials", "12", "--batch", "1", "--device-retries", "1",
         "--rpc-tracker", tracker, "--rpc-key", key, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while _records(work_dir) < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert _records(work_dir) >= 1, "no measurement before the deadline"
    finally:
        stop_started(device)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert "tuning stopped early: device" in out and "lost" in out, out
    new, _ = _measured(out)
    assert 1 <= new < 12
    assert _records(work_dir) == new
