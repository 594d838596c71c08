"""The benchmark suite: its quick mode runs end to end, and MNN's converter never reaches
the network, pip or its telemetry module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.engines import GUARD, mnn_available, mnn_convert
from npas_tvm.cli import main

needs_mnn = pytest.mark.skipif(not mnn_available(), reason="MNN is not installed")


@pytest.mark.parametrize("attempt, blocked", [
    ("from MNN.tools.utils.log import mnn_logger", "import MNN.tools.utils.log"),
    ("import socket; socket.create_connection(('192.0.2.1', 443), timeout=1)",
     "socket.create_connection"),
    ("import socket; socket.socket().connect(('192.0.2.1', 443))", "socket.connect"),
    ("import os; os.system('pip install -U aliyun-log-python-sdk')", "os.system"),
    ("import subprocess; subprocess.run(['pip', 'install', 'x'])", "subprocess.Popen"),
])
def test_the_converter_guard_blocks_telemetry_pip_and_network(attempt, blocked):
    done = subprocess.run([sys.executable, "-c", GUARD + attempt], capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode != 0 and f"blocked: {blocked}" in done.stderr


@needs_mnn
def test_mnn_conversion_runs_guarded_and_clean(zoo_onnx, tmp_path):
    """A real conversion under the guard: it succeeds, so nothing was attempted."""
    out = mnn_convert(zoo_onnx("vgg_cifar"), str(tmp_path / "v.mnn"), sparse=True)
    assert (tmp_path / "v.mnn").stat().st_size > 1000
    assert "MNN.tools.utils.log" not in sys.modules and out.endswith(".mnn")


@needs_mnn
def test_quick_suite_runs_every_engine_and_checks_them(tmp_path, capsys):
    results = tmp_path / "r.json"
    code = main(["bench", "--suite", "--quick", "--rounds", "2", "--work-dir",
                 str(tmp_path / "w"), "--json", str(results), "--markdown",
                 str(tmp_path / "r.md"), "--plots", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(results.read_text())
    rows = data["models"]["vgg_cifar"]
    engines = {row["engine"] for row in rows}
    assert {"onnxruntime", "tvm dense", "mnn", "pytorch eager", "npas-tvm rule",
            "mnn sparse rule", "npas-tvm uniform5"} <= engines
    assert all(row["max_rel_err"] <= 1e-4 and row["median_ms"] > 0 for row in rows)
    assert (tmp_path / "plots" / "models.png").stat().st_size > 1000
    assert "| npas-tvm rule | rule |" in (tmp_path / "r.md").read_text()
    assert "MNN.tools.utils.log" not in sys.modules


def test_report_renders_the_readme_section_from_json(tmp_path):
    from benchmarks.report import BEGIN, END, main as report

    results = {"machine": {"cpu": "test cpu", "cpus": 2, "system": "Linux x86_64"},
               "threads": 2, "rounds": 3, "date": "2026-01-01",
               "models": {"vgg_cifar": [
                   {"engine": "onnxruntime", "plan": "dense", "median_ms": 2.0,
                    "min_ms": 1.9, "max_ms": 2.2, "rounds": 3, "vs_onnxruntime": 1.0},
                   {"engine": "npas-tvm rule", "plan": "rule", "median_ms": 1.0,
                    "min_ms": 0.9, "max_ms": 1.1, "rounds": 3, "vs_onnxruntime": 2.0}]}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    assert report([str(tmp_path / "r.json"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| npas-tvm rule | rule | 1.00 | 0.90-1.10 | 2.00x |" in text
    assert text.endswith("after\n") and "test cpu" in text and "need a phone" in text


def test_family_goals_read_each_row_against_its_own_dense_time():
    from benchmarks.kernels_family import family_goals

    def row(layer, scheme, rate, ms, dense_ms):
        return {"layer": layer, "scheme": scheme, "rate": rate, "ms": ms,
                "dense_ms": dense_ms}

    lines = family_goals([
        row("conv3x3", "pattern", 3, 0.5, 1.1),          # 2.2x: met
        row("conv3x3", "block_punched", 3, 0.4, 9.0),
        row("conv3x3", "unstructured", 3, 0.45, 5.0),    # faster than the pattern
        row("conv1x1", "block_based", 5, 1.0, 4.0),
        row("conv1x1", "unaligned_block", 5, 1.05, 4.0),
        row("conv1x1", "block_based 4x1", 5, 2.0, 4.0),   # paired by block shape
        row("conv1x1", "unaligned_block 4x1", 5, 2.4, 4.0)])
    assert "pattern at 3x runs 2.20x faster than dense TVM (goal 2x: met)" in lines[0]
    assert lines[1].endswith("slower at 3x") and lines[2].endswith("faster at every rate")
    assert "(SIMD-wide blocks)" in lines[3] and lines[3].endswith("1.05 (goal <= 1.10: met)")
    assert "(4x1 blocks)" in lines[4] and lines[4].endswith("1.20 (goal <= 1.10: missed)")


def test_family_goals_add_the_fastest_rounds_where_the_rows_have_them():
    from benchmarks.kernels_family import family_goals

    def row(scheme, rate, ms, fastest, dense_ms=2.0, dense_fastest=1.6):
        return {"layer": "L", "scheme": scheme, "rate": rate, "ms": ms, "dense_ms": dense_ms,
                "fastest_ms": fastest, "dense_fastest_ms": dense_fastest}

    lines = family_goals([row("pattern", 3, 1.1, 0.7), row("unstructured", 3, 1.5, 1.4),
                          row("block_punched", 3, 1.0, 0.9)])
    assert "1.81x faster than dense TVM (goal 2x: missed)" in lines[0]
    assert lines[1] == "L:   in each engine's fastest round: 2.29x (dense TVM's median 25% " \
        "above its fastest)"
    lines = family_goals([row("block_based", 5, 1.0, 0.8), row("unaligned_block", 5, 1.2, 0.84),
                          row("block_based", 10, 1.0, 0.5), row("unaligned_block", 10, 1.1, 0.5)])
    assert lines[0].endswith("1.20 / 1.10 (goal <= 1.10: missed)")
    assert lines[1] == "L:   in each kernel's fastest round: 1.05 / 1.00"


def _spin(seconds: float):
    """A thread that keeps a CPU busy for ``seconds``, as a pool spinning after a call."""
    import threading
    import time

    def busy():
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    return thread


def test_wait_until_idle_outlasts_a_spinning_thread():
    from npas_tvm.runtime import wait_until_idle

    spinner = _spin(0.3)
    waited = wait_until_idle(max_s=5.0)
    spinner.join()
    assert waited >= 0.2
    assert wait_until_idle(max_s=5.0) < 0.5  # nothing spins now


def test_no_engine_is_timed_beside_another_engines_spinning_threads():
    """An engine whose call leaves a thread spinning (TVM's pool does for about 0.2 s)
    must not overlap the next engine's calls, warm or timed."""
    from npas_tvm.runtime import time_interleaved

    spinners, overlaps = [], []

    def leaves_a_spinner():
        spinners.append(_spin(0.15))

    def checks_for_spinners():
        overlaps.append(any(thread.is_alive() for thread in spinners))

    timings = time_interleaved({"spins": leaves_a_spinner, "checks": checks_for_spinners},
                               rounds=4, warmup=1, budget_s=None)
    assert timings["checks"].rounds == 4
    assert len(overlaps) == 1 + 2 * 4 and not any(overlaps)
