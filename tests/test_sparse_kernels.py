"""Sparse CPU kernels (tir_schedules.sparse_conv): the gathered-tap format and the kernels.

Properties of the packed format for any mask, and the built kernels (scheduled by
``schedule_primfunc``, as the pipeline does) against a numpy convolution / matmul on
masked weights: shapes, strides, padding, dilation, groups, rates, block sizes, ragged
GEMM blocks, blocks without taps, masks of the block-punched and block-based schemes,
epilogue fusion through Relax, and an aarch64 build.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tir_schedules import sparse_conv as sc

BUILD = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PACK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _host():
    from npas_tvm.targets import resolve_target
    from tir_schedules import default_config

    spec = resolve_target("host")
    return spec, default_config(spec)


def _blocked(x: np.ndarray, ib: int) -> np.ndarray:
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // ib, ib, h, w).transpose(0, 1, 3, 4, 2))


def _unblocked(y: np.ndarray) -> np.ndarray:
    n, chunks, h, w, b = y.shape
    return y.transpose(0, 1, 4, 2, 3).reshape(n, chunks * b, h, w)


def _masked(rng, shape, keep: float) -> np.ndarray:
    weight = rng.standard_normal(shape).astype("float32")
    return weight * (rng.random(shape) < keep)


def _schedule(func, cfg):
    """Scheduled like the pipeline does it; fails if the sparse template did not apply."""
    from tir_schedules import kernel_family, schedule_primfunc

    assert kernel_family(func).startswith("sparse")
    scheduled = schedule_primfunc(func, cfg)
    assert scheduled is not None, "the sparse template did not apply"
    assert _tap_loop_extents(scheduled) == ["counts"], "tap loop not bounded by the counts"
    return scheduled


def _tap_loop_extents(func) -> list[str]:
    """For each tap loop: "counts" if bounded by a loaded count, else its extent."""
    import tvm
    import tvm_ffi

    found = []

    def visit(loop, visitor):
        if loop.loop_var.name.startswith(sc.TAP_AXIS):
            loads = []
            tvm_ffi.structural_visit(loop.extent, [(tvm.ir.TensorLoad,
                                                    lambda n, v: loads.append(n) and None)])
            found.append("counts" if loads else str(loop.extent))
        visitor.default_visit(loop)

    tvm_ffi.structural_visit(func.body, [(tvm.tirx.For, visit)])
    return found


def conv_func(packed: sc.GatheredWeights, data_shape, strides, padding, dilation):
    from tvm import te

    data = te.placeholder(data_shape, name="data")
    values = te.placeholder(packed.values.shape, name="values")
    taps = te.placeholder(packed.taps.shape, "int32", name="taps")
    counts = te.placeholder(packed.counts.shape, "int32", name="counts")
    out = sc.sparse_conv2d_nchwc(data, values, taps, counts, strides, padding, dilation,
                                 packed.out_channels, kernel_size=packed.kernel_size)
    func = te.create_prim_func([data, values, taps, counts, out], index_dtype_override="int64")
    return func, [int(v) for v in out.shape]


def run_conv(x, weight, block, ib, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
             groups=1, cfg=None):
    """The scheduled sparse kernel's NCHW output for masked ``weight``."""
    import tvm

    spec, default = _host()
    packed = sc.pack_gathered(weight, block, groups)
    func, out_shape = conv_func(packed, _blocked(x, ib).shape, strides, padding, dilation)
    lib = tvm.compile(_schedule(func, cfg or default), spec.tvm_target)
    out = tvm.runtime.empty(out_shape, "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(a) for a in (_blocked(x, ib), packed.values, packed.taps,
                                          packed.counts)], out)
    return _unblocked(out.numpy())


def dense_func(packed: sc.GatheredWeights, rows: int, gemm_taps: bool = True,
               chains: int = 1):
    from tvm import te

    values_array, taps_array = sc.pad_to_chains(
        packed.values, packed.gemm_taps() if gemm_taps else packed.taps, chains)
    data = te.placeholder((rows, packed.in_channels), name="data")
    values = te.placeholder(values_array.shape, name="values")
    taps = te.placeholder(taps_array.shape, "int32", name="taps")
    counts = te.placeholder(packed.counts.shape, "int32", name="counts")
    out = sc.sparse_dense(data, values, taps, counts, packed.out_channels, chains)
    return te.create_prim_func([data, values, taps, counts, out], index_dtype_override="int64")


def run_dense(x, weight, block, gemm_taps=True, chains=1):
    import tvm

    spec, cfg = _host()
    packed = sc.pack_gathered(weight, block)
    func = _schedule(dense_func(packed, x.shape[0], gemm_taps, chains), cfg)
    lib = tvm.compile(func, spec.tvm_target)
    values, taps = sc.pad_to_chains(packed.values,
                                    packed.gemm_taps() if gemm_taps else packed.taps, chains)
    out = tvm.runtime.empty((x.shape[0], weight.shape[0]), "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(np.ascontiguousarray(a))
          for a in (x, values, taps, packed.counts)], out)
    return out.numpy()


def assert_close(got, ref):
    scale = max(float(np.abs(ref).max()), 1.0)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-5 * scale, rtol=1e-4)


# --- the packed format ------------------------------------------------------------------


@st.composite
def masked_weights(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    block = draw(st.sampled_from([1, 2, 4, 8]))
    gemm = draw(st.booleans()) and groups == 1
    per_group = draw(st.integers(1, 3)) * block if groups > 1 else draw(st.integers(1, 20))
    filters = per_group * groups
    group_in = draw(st.integers(1, 6))
    kh, kw = (1, 1) if gemm else (draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3])))
    keep = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = _masked(rng, (filters, group_in, kh, kw), keep)
    return (weight[:, :, 0, 0] if gemm else weight), block, groups


@PACK
@given(masked_weights())
def test_pack_round_trips_and_pads_with_valid_taps(case):
    weight, block, groups = case
    packed = sc.pack_gathered(weight, block, groups)
    np.testing.assert_array_equal(packed.unpack(), weight)
    conv = weight if weight.ndim == 4 else weight[:, :, None, None]
    filters, group_in, kh, kw = conv.shape
    group_out = filters // groups
    assert packed.values.dtype == np.float32 and packed.taps.dtype == np.int32
    assert packed.counts.dtype == np.int32
    assert packed.values.shape == (-(-filters // block), packed.max_taps, block)
    assert packed.taps.shape == (packed.blocks, packed.max_taps, 3)
    for b in range(packed.blocks):
        rows = conv[b * block:(b + 1) * block]
        assert packed.counts[b] == np.count_nonzero(np.any(rows != 0, axis=0))
        group = b * block // group_out
        channel, y, x = packed.taps[b].T
        assert np.all((channel >= group * group_in) & (channel < (group + 1) * group_in))
        assert np.all((y >= 0) & (y < kh) & (x >= 0) & (x < kw))
        assert not packed.values[b, packed.counts[b]:].any()
    assert packed.kept_macs_per_pixel() == int(packed.counts.sum()) * block
    assert packed.kept_macs_per_pixel() == packed.padded_macs_per_pixel()
    assert packed.padded_macs_per_pixel() <= packed.stored_macs_per_pixel()
    assert packed.in_channels == group_in * groups and packed.kernel_size == (kh, kw)


def test_pack_rejects_blocks_across_groups():
    with pytest.raises(ValueError, match="inside one group"):
        sc.pack_gathered(np.ones((12, 2, 3, 3), "float32"), 4, groups=2)
    with pytest.raises(ValueError, match="groups"):
        sc.pack_gathered(np.ones((10, 2, 3, 3), "float32"), 5, groups=3)
    sc.pack_gathered(np.ones((10, 7), "float32"), 4)  # a ragged GEMM block is fine


# --- conv kernels -----------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    ib = draw(st.sampled_from([4, 8]))
    block = draw(st.sampled_from([4, 8, 16]))
    groups = draw(st.sampled_from([1, 1, 2]))
    in_channels = ib * groups * draw(st.integers(1, 2))
    out_channels = block * groups * draw(st.integers(1, 2))
    kernel = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    pads = tuple(draw(st.integers(0, kernel // 2 * dilation)) for _ in range(4))
    span = (kernel - 1) * dilation + 1
    height = draw(st.integers(max(span - pads[0] - pads[2], 1), 11))
    width = draw(st.integers(max(span - pads[1] - pads[3], 1), 11))
    keep = draw(st.sampled_from([0.1, 0.3, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(ib=ib, block=block, groups=groups, in_channels=in_channels,
                out_channels=out_channels, kernel=kernel, stride=stride, dilation=dilation,
                pads=pads, size=(height, width), keep=keep, seed=seed)


def _check_conv(weight, case, x=None, cfg=None):
    rng = np.random.default_rng(case["seed"])
    if x is None:
        x = rng.standard_normal((1, case["in_channels"], *case["size"])).astype("float32")
    strides = (case["stride"],) * 2
    dilation = (case["dilation"],) * 2
    got = run_conv(x, weight, case["block"], case["ib"], strides, case["pads"], dilation,
                   case["groups"], cfg)
    assert_close(got, sc.reference_conv2d(x, weight, strides, case["pads"], dilation,
                                          case["groups"]))


@BUILD
@given(conv_cases())
def test_sparse_conv_matches_reference(case):
    rng = np.random.default_rng(case["seed"])
    k = case["kernel"]
    weight = _masked(rng, (case["out_channels"], case["in_channels"] // case["groups"], k, k),
                     case["keep"])
    _check_conv(weight, case)


def test_sparse_conv_blocks_without_taps():
    rng = np.random.default_rng(1)
    case = dict(ib=8, block=8, groups=1, in_channels=16, out_channels=32, kernel=3, stride=1,
                dilation=1, pads=(1, 1, 1, 1), size=(6, 7), keep=0.3, seed=1)
    weight = _masked(rng, (32, 16, 3, 3), 0.3)
    weight[8:16] = 0  # block 1: nothing kept
    weight[24:] = 0
    weight[24, 5, 2, 0] = 1.5  # block 3: a single tap
    _check_conv(weight, case)
    _check_conv(np.zeros_like(weight), case)  # every block empty


# --- dense kernels ----------------------------------------------------------------------


@BUILD
@given(rows=st.integers(1, 5), in_features=st.integers(1, 40), out_features=st.integers(1, 40),
       block=st.sampled_from([4, 8, 16]), keep=st.sampled_from([0.0, 0.1, 0.4, 1.0]),
       gemm_taps=st.booleans(), chains=st.sampled_from([1, 2, 8]),
       seed=st.integers(0, 2**32 - 1))
def test_sparse_dense_matches_numpy(rows, in_features, out_features, block, keep, gemm_taps,
                                    chains, seed):
    """Any shape, density and block; with partial sums (``chains``) too, whatever the
    blocks' tap counts modulo the chains."""
    rng = np.random.default_rng(seed)
    weight = _masked(rng, (out_features, in_features), keep)
    x = rng.standard_normal((rows, in_features)).astype("float32")
    assert_close(run_dense(x, weight, block, gemm_taps, chains),
                 x.astype(np.float64) @ weight.T)


def test_dense_chains_where_one_accumulator_would_wait():
    """Batch 1 with one vector per block (AVX-512, 16-row blocks): 2 partial sums;
    NEON's 4 vectors per block or a few rows already give independent FMAs."""
    assert sc.dense_chains(1, 16, 16) == 2
    assert sc.dense_chains(1, 8, 16) == 2
    assert sc.dense_chains(1, 16, 4) == 1
    assert sc.dense_chains(4, 16, 16) == 1


# --- masks of the pruning schemes ---------------------------------------------------------


@BUILD
@given(rate=st.sampled_from([2.0, 3.0, 5.0, 10.0]), bf=st.sampled_from([4, 8, 16]),
       bc=st.sampled_from([1, 4]), kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**32 - 1))
def test_block_punched_masks(rate, bf, bc, kernel, stride, seed):
    from npas_tvm.schemes import BlockPunchedSpec, make_mask

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((2 * bf, 16, kernel, kernel)).astype("float32")
    weight *= make_mask(weight, BlockPunchedSpec(rate=rate, block=(bf, bc)))
    packed = sc.pack_gathered(weight, bf)
    # punched through the block: every filter of a block keeps the same taps
    assert packed.kept_macs_per_pixel() == np.count_nonzero(weight)
    case = dict(ib=8, block=bf, groups=1, in_channels=16, out_channels=2 * bf, kernel=kernel,
                stride=stride, dilation=1, pads=(kernel // 2,) * 4, size=(9, 10), seed=seed)
    _check_conv(weight, case)


@BUILD
@given(rate=st.sampled_from([2.0, 3.0, 5.0, 10.0]), br=st.sampled_from([4, 8, 16]),
       bc=st.sampled_from([1, 2, 4, 8]), fc=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_block_based_masks(rate, br, bc, fc, seed):
    from npas_tvm.schemes import BlockBasedSpec, make_mask

    rng = np.random.default_rng(seed)
    if fc:  # ragged: rows not a multiple of the block
        weight = rng.standard_normal((3 * br + br // 2, 40)).astype("float32")
        weight *= make_mask(weight, BlockBasedSpec(rate=rate, block=(br, bc)))
        x = rng.standard_normal((2, 40)).astype("float32")
        assert_close(run_dense(x, weight, br), x.astype(np.float64) @ weight.T)
        return
    weight = rng.standard_normal((2 * br, 32, 1, 1)).astype("float32")
    weight *= make_mask(weight, BlockBasedSpec(rate=rate, block=(br, bc)))
    case = dict(ib=8, block=br, groups=1, in_channels=32, out_channels=2 * br, kernel=1,
                stride=1, dilation=1, pads=(0, 0, 0, 0), size=(7, 7), seed=seed)
    _check_conv(weight, case)


# --- schedule knobs and target families -----------------------------------------------------


@pytest.mark.parametrize("knobs", [
    dict(sparse_parallel="rows"), dict(sparse_parallel="blocks"),
    dict(sparse_pixel_tile=3), dict(sparse_accumulator_scope="local"),
    dict(parallel_min_flops=10**12),  # serial
    dict(lanes=8, vector_registers=16),  # the AVX2 family's numbers
    dict(family="arm", lanes=4, vector_registers=32),  # NEON's
])
def test_knobs_keep_results(knobs):
    _, cfg = _host()
    rng = np.random.default_rng(3)
    weight = _masked(rng, (32, 16, 3, 3), 0.2)
    weight[16:24] = 0
    case = dict(ib=8, block=8, groups=1, in_channels=16, out_channels=32, kernel=3, stride=1,
                dilation=1, pads=(1, 1, 1, 1), size=(8, 12), seed=3)
    _check_conv(weight, case, cfg=cfg.with_knobs(**knobs))


def test_batch_of_images():
    rng = np.random.default_rng(4)
    weight = _masked(rng, (16, 8, 3, 3), 0.3)
    x = rng.standard_normal((3, 8, 6, 5)).astype("float32")
    case = dict(ib=4, block=8, groups=1, in_channels=8, out_channels=16, kernel=3, stride=2,
                dilation=1, pads=(1, 0, 1, 2), size=(6, 5), seed=4)
    _check_conv(weight, case, x=x)


def test_register_tile_fits_each_family():
    from tir_schedules.config import CpuScheduleConfig

    for cfg in (CpuScheduleConfig("x86", 16, 32), CpuScheduleConfig("x86", 8, 16),
                CpuScheduleConfig("arm", 4, 32)):
        for width in (7, 14, 28, 56, 13):
            for block in (4, 8, 16, 32):
                tile = sc.pixel_tile(width, block, cfg)
                vectors = -(-block // cfg.lanes)
                assert width % tile == 0
                assert tile * vectors + vectors + 1 <= cfg.vector_registers or tile == 1
                assert tile * block * 4 <= cfg.max_local_bytes
    assert sc.pixel_tile(14, 16, CpuScheduleConfig("x86", 16, 32)) == 14
    assert sc.pixel_tile(14, 8, CpuScheduleConfig("x86", 8, 16)) == 14
    assert sc.pixel_tile(28, 16, CpuScheduleConfig("x86", 16, 32).with_knobs(
        sparse_pixel_tile=7)) == 7


# --- Relax: fusion with the epilogue, and the arm build ------------------------------------


def _relax_sparse_module(packed, x_shape, bias):
    """x -> sparse conv (blocked 5-D x) or sparse dense (2-D x) -> + bias -> clip."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    constants = [relax.const(a) for a in (packed.values, packed.taps, packed.counts)]
    with bb.function("main", [x]):
        with bb.dataflow():
            if len(x_shape) == 2:
                y = bb.emit(bb.call_te(sc.sparse_dense, x, *constants, packed.out_channels,
                                       primfunc_name_hint="sparse"))
            else:
                y = bb.emit(bb.call_te(sc.sparse_conv2d_nchwc, x, *constants, (1, 1),
                                       (1, 1, 1, 1), (1, 1), packed.out_channels,
                                       kernel_size=packed.kernel_size,
                                       primfunc_name_hint="sparse"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            out = bb.emit_output(bb.emit(relax.op.clip(y, 0.0, 6.0)))
        bb.emit_func_output(out)
    return bb.get()


def _fuse_and_schedule(mod, cfg):
    import tvm
    from tvm import relax

    from tir_schedules import kernel_family, schedule_primfunc

    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    patterns = {gv.name_hint: int(f.attrs["op_pattern"]) for gv, f in mod.functions_items()
                if isinstance(f, tvm.tirx.PrimFunc)}
    assert patterns["sparse"] == 4  # kOutEWiseFusable: the epilogue fuses into it
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    prims = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(prims) == 1, [gv.name_hint for gv, _ in prims]
    gv, func = prims[0]
    assert kernel_family(func).startswith("sparse")
    mod[gv] = _schedule(func, cfg).with_attr("tirx.is_scheduled", True)
    return mod


def test_epilogue_fuses_into_one_scheduled_kernel():
    import tvm
    from tvm import relax

    spec, cfg = _host()
    rng = np.random.default_rng(5)
    weight = _masked(rng, (32, 16, 3, 3), 0.25)
    weight[:8] = 0  # a block without taps: its output is the epilogue of 0
    packed = sc.pack_gathered(weight, 16)
    bias = rng.standard_normal((1, 2, 1, 1, 16)).astype("float32")
    x = rng.standard_normal((1, 16, 9, 11)).astype("float32")
    mod = _fuse_and_schedule(_relax_sparse_module(packed, (1, 2, 9, 11, 8), bias), cfg)
    vm = relax.VirtualMachine(tvm.compile(mod, spec.tvm_target), tvm.cpu())
    got = _unblocked(vm["main"](tvm.runtime.tensor(_blocked(x, 8))).numpy())
    ref = sc.reference_conv2d(x, weight, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert_close(got, np.clip(ref + _unblocked(bias), 0, 6))


def test_dense_epilogue_fuses_into_one_scheduled_kernel():
    import tvm
    from tvm import relax

    spec, cfg = _host()
    rng = np.random.default_rng(7)
    weight = _masked(rng, (21, 30), 0.3)  # ragged: 21 rows in blocks of 8
    packed = sc.pack_gathered(weight, 8)
    bias = rng.standard_normal(21).astype("float32")
    x = rng.standard_normal((3, 30)).astype("float32")
    mod = _fuse_and_schedule(_relax_sparse_module(packed, (3, 30), bias), cfg)
    vm = relax.VirtualMachine(tvm.compile(mod, spec.tvm_target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert_close(got, np.clip(x.astype(np.float64) @ weight.T + bias, 0, 6))


def test_builds_for_arm():
    import tvm

    from npas_tvm.targets import resolve_target
    from tir_schedules import default_config

    spec = resolve_target("arm-cpu")
    cfg = default_config(spec)
    rng = np.random.default_rng(6)
    packed = sc.pack_gathered(_masked(rng, (8, 8, 3, 3), 0.3), 4)
    bias = rng.standard_normal((1, 2, 1, 1, 4)).astype("float32")
    mod = _fuse_and_schedule(_relax_sparse_module(packed, (1, 2, 10, 10, 4), bias), cfg)
    assert tvm.compile(mod, spec.tvm_target) is not None
    gemm = sc.pack_gathered(_masked(rng, (10, 24), 0.3), 4)
    lib = tvm.compile(_schedule(dense_func(gemm, 1), cfg), spec.tvm_target)
    assert "fmla" in lib.mod.inspect_source("asm")  # NEON vector FMAs


def test_padding_never_reaches_the_output():
    """Garbage in the padded weights changes nothing: the template's schedule bounds the
    tap loop by the count, and a tap loop it did not place (here split in two) keeps the
    compute's guard."""
    import tvm

    from tir_schedules import schedule_primfunc

    spec, cfg = _host()
    rng = np.random.default_rng(8)
    weight = _masked(rng, (16, 8, 3, 3), 0.3)
    weight[8:] = 0
    weight[8, 0, 1, 1] = 2.0  # block 1 keeps one tap: 50+ padded taps
    packed = sc.pack_gathered(weight, 8)
    values = packed.values.copy()
    for b, count in enumerate(packed.counts):
        values[b, count:] = 1e3
    func, out_shape = conv_func(packed, (1, 2, 6, 6, 4), (1, 1), (1, 1, 1, 1), (1, 1))
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock(sc.SPARSE_CONV_BLOCK)
    sch.split(sch.get_loops(block)[-1], [None, 2])
    foreign = sc.bound_tap_loops(sch.mod["main"])
    assert "counts" not in _tap_loop_extents(foreign)
    x = rng.standard_normal((1, 8, 6, 6)).astype("float32")
    ref = sc.reference_conv2d(x, weight, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    for scheduled in (foreign, schedule_primfunc(func, cfg)):
        lib = tvm.compile(scheduled, spec.tvm_target)
        out = tvm.runtime.empty(out_shape, "float32", tvm.cpu())
        lib(*[tvm.runtime.tensor(a) for a in (_blocked(x, 4), values, packed.taps,
                                              packed.counts)], out)
        assert_close(_unblocked(out.numpy()), ref)
