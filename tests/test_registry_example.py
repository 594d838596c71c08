"""The README's worked example: a new scheme, registered in one place, compiles sparse.

``channel_punched`` removes whole input channels (all kernel positions) per block of
consecutive filters. Its filters share their kept taps, so it reuses the gathered-tap
kernel: the scheme needs its spec, mask and checker, and one line of kernel registration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from npas_tvm.schemes import CONV, Granularity, Scheme, SchemeSpec, kept_target
from npas_tvm.schemes._core import select_prefix


# --- the example (README: "Adding a scheme") -------------------------------------------
@dataclass(frozen=True)
class ChannelPunchedSpec(SchemeSpec):
    """Whole input channels removed per block of ``filters`` consecutive filters."""

    filters: int = 8
    scheme = "channel_punched"


def channel_scores(weight: np.ndarray, filters: int) -> np.ndarray:
    """[F / filters, C]: the L2 norm of each input channel over a block's filters."""
    f, c = weight.shape[:2]
    blocks = weight.reshape(f // filters, filters, c, -1).astype(np.float64)
    return np.sqrt(np.square(blocks).sum(axis=(1, 3)))


def channel_punched_mask(weight: np.ndarray, spec: ChannelPunchedSpec) -> np.ndarray:
    unit = spec.filters * weight[0, 0].size           # weights per (block, channel)
    keep = select_prefix(channel_scores(weight, spec.filters), unit,
                         kept_target(weight.size, spec.rate))
    return np.broadcast_to(np.repeat(keep, spec.filters, axis=0)[:, :, None, None],
                           weight.shape).copy()


def channel_punched_cover(mask: np.ndarray, spec: ChannelPunchedSpec) -> int:
    f, c = mask.shape[:2]
    kept = mask.reshape(f // spec.filters, spec.filters, c, -1).any(axis=(1, 3))
    return int(kept.sum()) * spec.filters * mask[0, 0].size


def register_channel_punched():
    from npas_tvm.schemes import register_scheme
    from relay_passes import register_sparse_kernel
    from relay_passes.sparse_kernels import GatheredKernel

    register_scheme(Scheme(
        name="channel_punched", spec_type=ChannelPunchedSpec, mask=channel_punched_mask,
        cover=channel_punched_cover, kinds=(CONV,), strength=45,
        granularity=lambda shape, spec: Granularity(
            step=spec.filters * shape[2] * shape[3], min_kept=spec.filters * shape[2] * shape[3],
            max_kept=int(np.prod(shape))),
        shape_check=lambda shape, spec: (None if shape[0] % spec.filters == 0 else
                                         f"{shape[0]} filters are not a multiple of "
                                         f"{spec.filters}"),
        paper="(example)", summary="whole input channels per block of filters"))

    class ChannelPunchedKernel(GatheredKernel):     # blocks share their taps: reuse it
        def output_block(self, spec):
            return spec.filters

    register_sparse_kernel("channel_punched", ChannelPunchedKernel())
# --- end of the example ------------------------------------------------------------------


@pytest.fixture
def channel_punched():
    from npas_tvm.schemes import SCHEMES

    register_channel_punched()
    yield
    del SCHEMES["channel_punched"]


def test_registered_scheme_plans_prunes_and_compiles_sparse(channel_punched, tmp_path, capsys):
    import json

    from npas_tvm.cli import main
    from npas_tvm.schemes import satisfies, spec_from_json
    from onnx_graphs import small_cnn

    model = small_cnn(tmp_path / "m.onnx")
    plan = {"format": "npas-plan", "version": 1,
            "layers": {"conv1.weight": {"scheme": "channel_punched", "rate": 4, "filters": 16}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    code = main(["compile", model, "--npas", str(tmp_path / "plan.json"),
                 "-o", str(tmp_path / "m.so"), "--check"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    row = next(line for line in out.splitlines() if line.startswith("conv1.weight"))
    assert "channel_punched" in row and "gathered" in row and " 4.00x" in row
    assert ": OK" in out

    import onnx
    from onnx import numpy_helper

    pruned = onnx.load(str(tmp_path / "m.pruned.onnx"))
    weight = next(numpy_helper.to_array(i) for i in pruned.graph.initializer
                  if i.name == "conv1.weight")
    spec = spec_from_json(plan["layers"]["conv1.weight"])
    assert satisfies(weight, spec)
    assert not satisfies(np.random.default_rng(0).standard_normal(weight.shape), spec)
