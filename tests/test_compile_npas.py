"""``npas-tvm compile --npas``: every zoo model, host and arm-cpu, checked against
onnxruntime on the pruned ONNX written beside the library; detection of a pruned
model; bad input gives one line and exit code 2."""

from __future__ import annotations

import json
import os

import pytest

from npas_tvm.cli import main
from npas_tvm.zoo import ZOO_NAMES


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_rule_plan_compiles_sparse_and_matches_the_pruned_onnx(zoo_onnx, tmp_path, capsys,
                                                               name):
    library = str(tmp_path / f"{name}.so")
    code, out, err = run_cli(["compile", zoo_onnx(name), "--npas", "-o", library, "--check"],
                             capsys)
    assert code == 0, out + err
    assert "rule-based plan at 3x" in out
    assert os.path.exists(tmp_path / f"{name}.pruned.onnx")
    assert "gathered" in out and ": OK" in out
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_rule_plan_compiles_for_arm_cpu(zoo_onnx, tmp_path, capsys, name):
    library = tmp_path / f"{name}.so"
    code, out, err = run_cli(["compile", zoo_onnx(name), "--target", "arm-cpu",
                              "--npas", "rule", "--rate", "5", "-o", str(library)], capsys)
    assert code == 0, out + err
    assert "gathered" in out
    with open(library, "rb") as handle:
        header = handle.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183


def test_a_pruned_model_compiles_sparse_without_a_plan(zoo_onnx, tmp_path, capsys):
    first = str(tmp_path / "first.so")
    code, out, err = run_cli(["compile", zoo_onnx("vgg_cifar"), "--npas", "rule",
                              "-o", first], capsys)
    assert code == 0, out + err
    pruned = str(tmp_path / "first.pruned.onnx")
    code, out, err = run_cli(["compile", pruned, "--npas", "-o", str(tmp_path / "again.so"),
                              "--check"], capsys)
    assert code == 0, out + err
    assert "schemes detected from the weights' zeros" in out
    assert out.count("gathered") >= 3 and ": OK" in out  # the rule plan: block schemes


def test_a_plan_file_is_followed(zoo_onnx, tmp_path, capsys):
    plan = {"format": "npas-plan", "version": 1,
            "layers": {"features.3.weight": {"scheme": "block_punched", "rate": 5,
                                             "block": [16, 4]}}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    code, out, err = run_cli(["compile", zoo_onnx("vgg_cifar"), "--npas", str(path),
                              "-o", str(tmp_path / "v.so"), "--check"], capsys)
    assert code == 0, out + err
    rows = [line for line in out.splitlines() if line.startswith("features.")]
    assert len(rows) == 1 and "block_punched" in rows[0] and " 5.0" in rows[0]


@pytest.mark.parametrize("args, message", [
    (["--npas", "missing.json"], "missing.json: no such plan file"),
    (["--npas", "detect", "--rate", "3"], "--rate applies to --npas rule"),
    (["--rate", "3"], "--rate applies to --npas rule"),
])
def test_bad_npas_arguments_give_one_line(zoo_onnx, tmp_path, capsys, args, message):
    code, out, err = run_cli(["compile", zoo_onnx("vgg_cifar"), "-o", str(tmp_path / "x.so"),
                              *args], capsys)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_plan_naming_an_unknown_layer_is_refused(zoo_onnx, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": "npas-plan", "version": 1,
                                "layers": {"features.3.weigth": {"scheme": "dense"}}}))
    code, _, err = run_cli(["compile", zoo_onnx("vgg_cifar"), "--npas", str(path),
                            "-o", str(tmp_path / "x.so")], capsys)
    assert code == 2 and "features.3.weigth" in err and "did you mean" in err


def test_demo_builds_dense_and_sparse_and_prints_the_table(tmp_path, capsys):
    code, out, err = run_cli(["demo", "--model", "vgg_cifar", "--rounds", "3",
                              "--work-dir", str(tmp_path)], capsys)
    assert code == 0, out + err
    assert out.count("(OK)") == 2 and "MISMATCH" not in out
    row = next(line for line in out.splitlines() if line.startswith("| vgg_cifar |"))
    assert len(row.split("|")) == 10
    assert all(cell.strip().endswith(("x faster", "x slower")) for cell in row.split("|")[5:7])


def test_demo_table_says_slower_where_the_sparse_build_is_slower(capsys):
    from npas_tvm.commands.demo import print_table
    from npas_tvm.runtime import Timing

    def timing(ms):
        return Timing(ms, ms, ms, 20)

    print_table([("m", {"sparse": timing(6.6), "dense": timing(8.3), "ort": timing(6.0)})])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| m | 6.60 | 8.30 | 6.00 | 1.10x slower | 1.26x faster | 1.38x | 20 |"


def test_lowering_table_columns_line_up_with_long_names():
    """The table's columns fit the longest scheme and kernel names (``unaligned_block``,
    ``unaligned_gathered``): every row's kernel starts under the header's."""
    from types import SimpleNamespace

    from npas_tvm.schemes import PatternSpec, UnalignedBlockSpec
    from npas_tvm.sparse_compile import format_lowering_table
    from npas_tvm.targets import resolve_target

    rows = [SimpleNamespace(name="conv1.weight", kind="conv1x1", kernel="unaligned_gathered",
                            spec=UnalignedBlockSpec(rate=10, block=(16, 1)), reason="",
                            dense_macs=10_000_000, kept_macs=1_000_000, computed_macs=2_000_000),
            SimpleNamespace(name="conv2.weight", kind="conv3x3", kernel="pattern",
                            spec=PatternSpec(rate=3), reason="",
                            dense_macs=9_000_000, kept_macs=3_000_000, computed_macs=3_000_000)]
    lines = format_lowering_table(rows, resolve_target("host")).splitlines()
    column = lines[0].index("kernel")
    assert lines[2][column:].startswith("unaligned_gathered ")
    assert lines[3][column:].startswith("pattern ")
    assert lines[2].index("unaligned_block") == lines[0].index("scheme")
