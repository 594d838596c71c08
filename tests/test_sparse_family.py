"""The pattern, row-sparse (CSR) and unaligned-block kernels.

Formats round-trip for any mask of their scheme; built kernels (scheduled as the
pipeline does) match numpy over shapes, strides, dilation, groups, rates and pattern
counts; whole models through the npas pipeline match onnxruntime on the pruned ONNX;
the OpenCL schedules run on PoCL.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_graphs import make_graph, small_cnn
from test_npas_passes import _lower_and_check
from test_sparse_kernels import _blocked, _host, _tap_loop_extents, _unblocked

from npas_tvm.schemes import (BlockBasedSpec, PatternSpec, UnalignedBlockSpec,
                              UnstructuredSpec, make_mask, satisfies)
from npas_tvm.schemes.pattern import CANDIDATES
from tir_schedules import sparse_conv as sc
from tir_schedules import sparse_csr as cs
from tir_schedules import sparse_pattern as sp
from tir_schedules import sparse_ring as sr
from tir_schedules import sparse_unaligned as su
from tir_schedules.lowering import cpu_pipeline

BUILD = settings(max_examples=6, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PACK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _build(out, inputs, arrays, family: str):
    import tvm
    from tvm import te

    from tir_schedules import kernel_family, schedule_primfunc

    spec, cfg = _host()
    func = te.create_prim_func([*inputs, out], index_dtype_override="int64")
    assert kernel_family(func) == family
    scheduled = schedule_primfunc(func, cfg)
    assert scheduled is not None
    if family == "sparse_pattern_entries":  # compute_at renamed the tap loop
        assert _loops_bounded_by_loads(scheduled) >= 1
    else:
        assert _tap_loop_extents(scheduled) == ["counts"]
    lib = tvm.compile(scheduled, spec.tvm_target, tir_pipeline=cpu_pipeline())
    result = tvm.runtime.empty([int(v) for v in out.shape], "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], result)
    return _unblocked(result.numpy())


def _run_scheduled(func, arrays: list, out_shape) -> np.ndarray:
    """``func`` scheduled by its template (which must apply), built for the host and run
    on ``arrays``."""
    import tvm

    from tir_schedules import schedule_primfunc

    spec, cfg = _host()
    scheduled = schedule_primfunc(func, cfg)
    assert scheduled is not None, "the kernel's template did not apply"
    lib = tvm.compile(scheduled, spec.tvm_target, tir_pipeline=cpu_pipeline())
    got = tvm.runtime.empty(tuple(out_shape), "float32", tvm.cpu())
    lib(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], got)
    return got.numpy()


def _loops_bounded_by_loads(func) -> int:
    """Loops whose extent is read from a buffer (the kernels' per-block counts)."""
    import tvm
    import tvm_ffi

    bounded = []

    def visit(loop, visitor):
        loads = []
        tvm_ffi.structural_visit(loop.extent, [(tvm.ir.TensorLoad,
                                                lambda n, v: loads.append(n) and None)])
        bounded.append(bool(loads))
        visitor.default_visit(loop)

    tvm_ffi.structural_visit(func.body, [(tvm.tirx.For, visit)])
    return sum(bounded)


def _pattern_weight(rng, filters, group_in, rate, patterns):
    weight = rng.standard_normal((filters, group_in, 3, 3)).astype("float32")
    return weight * make_mask(weight, PatternSpec(rate=rate, patterns=patterns))


def run_pattern(x, weight, strides, dilation, groups, ib=4, ob=4, entries=False, tile=32,
                pad=None, fold_rows=False):
    from tvm import te

    packed = sp.pack_pattern(weight, groups)
    xb = _blocked(x, ib)
    pad = [dilation[0], dilation[1]] * 2 if pad is None else list(pad)
    ph = [te.placeholder(xb.shape, name="data"), te.placeholder(packed.weights.shape, name="w"),
          te.placeholder(packed.channels.shape, "int32", name="ch"),
          te.placeholder(packed.counts.shape, "int32", name="n"),
          te.placeholder(packed.position.shape, "int32", name="pos")]
    if entries:
        lanes = _host()[1].lanes
        out = sp.pattern_entries_conv2d(*ph, packed.patterns, strides, pad, dilation, tile,
                                        ob, lanes, fold_rows)
    else:
        out = sp.pattern_conv2d(*ph, packed.patterns, strides, pad, dilation, tile, ob)
    got = _build(out, ph, [xb, packed.weights, packed.channels, packed.counts,
                           packed.position],
                 "sparse_pattern_entries" if entries else "sparse_pattern")
    return got, sc.reference_conv2d(x, weight, strides, pad, dilation, groups)


def run_rows(x, weight, rows, strides, dilation, groups, ib=4, ob=4, tile=None):
    """The flat form (``tile`` None, CSR's) or the register tiles of ``tile``."""
    from tvm import te

    packed = sc.pack_gathered(weight, rows, groups)
    xb = _blocked(x, ib)
    k = weight.shape[2]
    pad = [dilation[0] * (k // 2), dilation[1] * (k // 2)] * 2
    ph = [te.placeholder(xb.shape, name="data"), te.placeholder(packed.values.shape, name="v"),
          te.placeholder(packed.taps.shape, "int32", name="t"),
          te.placeholder(packed.counts.shape, "int32", name="n")]
    if tile is None:
        out = cs.rows_conv2d(*ph, strides, pad, dilation, weight.shape[0], (k, k), 48, ob)
    else:
        out = cs.tiled_rows_conv2d(*ph, strides, pad, dilation, weight.shape[0], (k, k),
                                   tile(cs.pixel_grid(xb.shape, (k, k), strides, pad,
                                                      dilation, 16).out_size), ob)
    got = _build(out, ph, [xb, packed.values, packed.taps, packed.counts], "sparse_rows")
    return got, sc.reference_conv2d(x, weight, strides, pad, dilation, groups)


def _any_row_tile(out_size, height: int, width: int, quantum: int) -> cs.RowTile:
    """A register tile of up to ``height`` rows by ``width`` vectors of ``quantum``
    lanes over an output of ``out_size``, padded to whole tiles."""
    out_h, out_w = out_size
    row = -(-out_w // quantum) * quantum
    tile_h, tile_w = min(height, out_h), min(width * quantum, row)
    return cs.RowTile(quantum, tile_h, tile_w,
                      (-(-out_h // tile_h) * tile_h, -(-row // tile_w) * tile_w))


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(ref).max()))


# ------------------------------------------------------------------ formats


@PACK
@given(seed=st.integers(0, 10**6), filters=st.sampled_from([4, 8, 12]),
       channels=st.integers(1, 9), rate=st.sampled_from([2.25, 3, 5, 10, 40]),
       patterns=st.integers(1, 8), groups=st.sampled_from([1, 2]))
def test_pattern_format_round_trips_any_pattern_mask(seed, filters, channels, rate, patterns,
                                                     groups):
    rng = np.random.default_rng(seed)
    weight = _pattern_weight(rng, filters, channels, rate, patterns)
    weight[rng.random(weight.shape) < 0.1] = 0  # kernels with fewer than 4 entries too
    packed = sp.pack_pattern(weight, groups)
    np.testing.assert_array_equal(packed.unpack(), weight)
    assert packed.kept_kernels() == int(weight.reshape(-1, 9).any(axis=1).sum())
    assert len(packed.patterns) <= max(patterns, 1) + 1
    counts = packed.counts.reshape(filters, -1).sum(axis=1)
    assert list(counts) == sorted(counts, reverse=True)  # filter-kernel reorder


@given(st.lists(st.integers(0, len(CANDIDATES) - 1), min_size=1, max_size=12, unique=True))
def test_pattern_loops_run_in_a_chain_of_shared_entries(patterns):
    """Each next pattern loop shares at least as many entries with the last as any
    pattern left: a permutation, and the planes it shares stay in registers."""
    chain = sp.chain_patterns(patterns)
    assert sorted(chain) == sorted(patterns) and chain[0] == patterns[0]

    def shared(a, b):
        return int(np.count_nonzero(CANDIDATES[a] & CANDIDATES[b]))

    for i in range(1, len(chain)):
        assert all(shared(chain[i - 1], chain[i]) >= shared(chain[i - 1], rest)
                   for rest in chain[i:])


def test_pattern_pack_rejects_a_non_pattern_kernel():
    weight = np.ones((2, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="not a pattern mask"):
        sp.pack_pattern(weight)


@PACK
@given(seed=st.integers(0, 10**6), rows=st.sampled_from([8, 13, 24]),
       cols=st.sampled_from([4, 9]), size=st.sampled_from([2, 4]), rate=st.sampled_from([2, 5]))
def test_rows_choice_counts_the_stored_taps(seed, rows, cols, size, rate):
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype("float32")
    weight *= make_mask(weight, UnalignedBlockSpec(rate=rate, block=(size, 1)))
    assert cs.straddle_entries(weight, 1) == np.count_nonzero(weight)
    chosen = cs.choose_rows(weight)
    assert chosen in (1, 2, 4, 8)
    assert sc.pack_gathered(weight, chosen).unpack().shape == weight.shape


# ------------------------------------------------------------------ built kernels


@BUILD
@given(seed=st.integers(0, 10**6), channels=st.sampled_from([4, 8]),
       filters=st.sampled_from([4, 8]), size=st.integers(5, 11),
       stride=st.sampled_from([1, 2]), dilation=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2, 4]), rate=st.sampled_from([2.25, 3, 5, 10]),
       patterns=st.integers(1, 8))
def test_pattern_kernel_matches_numpy(seed, channels, filters, size, stride, dilation, groups,
                                      rate, patterns):
    rng = np.random.default_rng(seed)
    weight = _pattern_weight(rng, filters, channels // groups, rate, patterns)
    x = rng.standard_normal((1, channels, size, size)).astype("float32")
    _close(*run_pattern(x, weight, (stride, stride), (dilation, dilation), groups))


@BUILD
@given(seed=st.integers(0, 10**6), channels=st.sampled_from([4, 8, 12]),
       filters=st.sampled_from([4, 8, 12]), size=st.integers(3, 12),
       dilation=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 4]),
       rate=st.sampled_from([2.25, 3, 5, 10]), patterns=st.integers(1, 8),
       tile=st.sampled_from([16, 32, 48, 112]), fold_rows=st.booleans(),
       padding=st.sampled_from(["same", "valid", "top_left", "bottom_right"]))
def test_pattern_entry_form_matches_numpy(seed, channels, filters, size, dilation, groups,
                                          rate, patterns, tile, fold_rows, padding):
    """The CPU form for stride 1: per-plane products, then shifts; entry planes (input
    rows a zero gap apart, padding rows skipped) or column planes (row shifts at the
    load); any tile, padding, filter group and pattern set."""
    rng = np.random.default_rng(seed)
    weight = _pattern_weight(rng, filters, channels // groups, rate, patterns)
    size = max(size, 2 * dilation + 1)
    x = rng.standard_normal((1, channels, size, size)).astype("float32")
    d = dilation
    pad = {"same": (d, d, d, d), "valid": (0, 0, 0, 0), "top_left": (2 * d, 2 * d, 0, 0),
           "bottom_right": (0, 0, 2 * d, 2 * d)}[padding]
    _close(*run_pattern(x, weight, (1, 1), (d, d), groups, entries=True, tile=tile,
                        pad=pad, fold_rows=fold_rows))


@pytest.mark.parametrize("form", [sp.EntryForm(False, 48), sp.EntryForm(True, 112)])
def test_pattern_entry_form_keeps_its_register_tile_on_the_stack(form):
    """Its accumulators (9 entries x 3 vectors, or 3 columns x 7) exceed TVM's 1 KiB
    stack limit; the CPU pipeline keeps them an alloca (a heap workspace would be
    stored around every pattern's loop)."""
    import tvm
    from tvm import te

    from tir_schedules import schedule_primfunc

    rng = np.random.default_rng(3)
    weight = _pattern_weight(rng, 16, 16, 3, 8)
    packed = sp.pack_pattern(weight)
    ph = [te.placeholder((1, 4, 14, 14, 4), name="data"),
          te.placeholder(packed.weights.shape, name="w"),
          te.placeholder(packed.channels.shape, "int32", name="ch"),
          te.placeholder(packed.counts.shape, "int32", name="n"),
          te.placeholder(packed.position.shape, "int32", name="pos")]
    out = sp.pattern_entries_conv2d(*ph, packed.patterns, (1, 1), (1, 1, 1, 1), (1, 1),
                                    form.tile, 4, 16, form.fold_rows)
    spec, cfg = _host()
    func = schedule_primfunc(te.create_prim_func([*ph, out], index_dtype_override="int64"),
                             cfg)

    def workspace_mentions(**kwargs) -> int:  # calls go through a loaded pointer
        return tvm.compile(func, spec.tvm_target, **kwargs).mod.inspect_source("ll").count(
            "TVMBackendAllocWorkspace")

    # TVM's pipeline: the pad and products buffers and the tile; ours: not the tile
    assert workspace_mentions(tir_pipeline=cpu_pipeline()) < workspace_mentions()


def test_pattern_kernel_depthwise_and_fully_pruned_filters():
    rng = np.random.default_rng(1)
    weight = _pattern_weight(rng, 8, 1, 3, 4)
    weight[:3] = 0  # connectivity-pruned filters: zero output, no work
    x = rng.standard_normal((1, 8, 7, 7)).astype("float32")
    _close(*run_pattern(x, weight, (1, 1), (1, 1), 8))


@BUILD
@given(seed=st.integers(0, 10**6), kernel=st.sampled_from([1, 3]),
       size=st.integers(4, 10), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), rows=st.sampled_from([1, 2, 4]),
       groups=st.sampled_from([1, 2]), rate=st.sampled_from([2, 3, 5, 10]))
def test_rows_kernel_matches_numpy(seed, kernel, size, stride, dilation, rows, groups, rate):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((12, 8 // groups, kernel, kernel)).astype("float32")
    weight *= make_mask(weight, UnstructuredSpec(rate=rate))
    x = rng.standard_normal((1, 8, size, size)).astype("float32")
    got, ref = run_rows(x, weight, rows if groups == 1 else 2, (stride, stride),
                        (dilation, dilation), groups, ob=4)
    _close(got, ref)


@BUILD
@given(seed=st.integers(0, 10**6), kernel=st.sampled_from([1, 3]),
       size=st.integers(3, 11), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), rows=st.sampled_from([2, 4, 8]),
       groups=st.sampled_from([1, 2]), height=st.integers(1, 4), width=st.integers(1, 3),
       quantum=st.sampled_from([4, 8]), ubp=st.booleans())
def test_row_tiles_match_numpy(seed, kernel, size, stride, dilation, rows, groups, height,
                               width, quantum, ubp):
    """Any register tile, ragged against the output or not: the kernel computes the
    padding and the write-back from registers skips it."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((16, 8 // groups, kernel, kernel)).astype("float32")
    spec = UnalignedBlockSpec(rate=3, block=(4, 1)) if ubp and kernel == 1 \
        else UnstructuredSpec(rate=3)
    weight *= make_mask(weight, spec)
    x = rng.standard_normal((1, 8, size, size)).astype("float32")

    got, ref = run_rows(x, weight, rows if groups == 1 else 2, (stride, stride),
                        (dilation, dilation), groups, ob=4,
                        tile=lambda out: _any_row_tile(out, height, width, quantum))
    _close(got, ref)


@BUILD
@given(seed=st.integers(0, 10**6), chunks=st.integers(1, 3), ib=st.sampled_from([4, 8]),
       height=st.integers(1, 9), width=st.integers(1, 17), kernel=st.sampled_from([1, 3]),
       top_left=st.sampled_from([(0, 0), (1, 0), (0, 2)]), batch=st.sampled_from([1, 2]),
       quantum=st.sampled_from([4, 8]), slack=st.integers(0, 3))
def test_padding_copy_matches_numpy(seed, chunks, ib, height, width, kernel, top_left, batch,
                                    quantum, slack):
    """The pixel kernels' padding copy, scheduled as they schedule it (transposed in
    tiles where a plane's rows start at the input's own and are whole runs of ``ib``,
    element by element elsewhere), and the TIR kernels' (:func:`transposed_flat_input`):
    padding on every side, planes past the channels (zero), channel blocks of 4 and 8,
    batches."""
    import tvm
    from tvm import te
    from tvm.script import tirx as T

    top, left = top_left
    shape = (batch, chunks, height, width, ib)
    data = te.placeholder(shape, "float32", "data")
    grid = cs.pixel_grid(shape, (kernel, kernel), (1, 1), (top, left, kernel - 1, 1),
                         (1, 1), quantum).with_row_quantum(quantum)
    flat = cs.flat_input(data, grid, extent=grid.extent + slack * grid.plane)
    sch = tvm.s_tir.Schedule(te.create_prim_func([data, flat]))
    cs._schedule_padding_copy(sch, _host()[1], work=0)
    tiles = "data_local" in sch.mod.script()  # the transposed form's cache_read stage
    assert tiles == (top_left == (0, 0) and grid.padded[1] % ib == 0 and width >= ib)
    copy = cs.transposed_flat_input(shape, grid, int(flat.shape[1]))
    flat_dims = tuple(int(v) for v in flat.shape)

    @T.prim_func(s_tir=True)
    def tir_copy(data: T.Buffer(shape, "float32"), out: T.Buffer(flat_dims, "float32")):
        copy(data, out)

    x = np.random.default_rng(seed).standard_normal(shape).astype("float32")
    planes = x.transpose(0, 1, 4, 2, 3).reshape(batch, chunks * ib, height, width)
    want = np.zeros((batch, flat_dims[1] // grid.plane, grid.plane_rows, grid.padded[1]),
                    "float32")
    want[:, :chunks * ib, top:top + height, left:left + width] = planes
    for func in (sch.mod, tir_copy):
        lib = tvm.compile(func, _host()[0].tvm_target, tir_pipeline=cpu_pipeline())
        got = tvm.runtime.empty(flat_dims, "float32", tvm.cpu())
        lib(tvm.runtime.tensor(x), got)
        np.testing.assert_array_equal(got.numpy(), want.reshape(batch, -1))


@PACK
@given(seed=st.integers(0, 10**6), filters=st.integers(4, 40), columns=st.integers(1, 12),
       rows=st.sampled_from([2, 4, 8]), rate=st.sampled_from([1.5, 3, 10]), ubp=st.booleans())
def test_ring_format_round_trips_any_mask(seed, filters, columns, rows, rate, ubp):
    """Blocks sorted by start row, any mask (UBP blocks or single weights, covered by
    blocks), the last rows' blocks moved up: unpacking gives the weight back, each
    block is stored once, and no block crosses the last row."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((filters, columns)).astype("float32")
    if ubp and filters >= rows:
        weight *= make_mask(weight, UnalignedBlockSpec(rate=rate, block=(rows, 1)))
    else:
        weight *= rng.random(weight.shape) < 1 / rate
    if filters < rows:
        with pytest.raises(ValueError):
            sr.pack_ring(weight, rows)
        return
    ring = sr.pack_ring(weight, rows)
    np.testing.assert_array_equal(ring.unpack(), weight)
    starts = ring.starts
    assert starts[0] == 0 and np.all(np.diff(starts) >= 0) and starts[-1] == ring.blocks()
    assert np.all(np.diff(starts)[filters - rows + 1:] == 0)  # a block ends by the last row
    if ubp and filters >= rows:
        kept = np.count_nonzero(make_mask(weight, UnalignedBlockSpec(rate=rate,
                                                                     block=(rows, 1))))
        assert ring.blocks() <= max(1, kept // rows)


def run_ring(x, weight, rows, strides, dilation, ib, ob, tile, registers=16, lanes=8):
    """The ring kernel built and scheduled as the pipeline does, and numpy's answer."""
    from tir_schedules import kernel_family

    k = weight.shape[2]
    pad = [dilation[0] * (k // 2), dilation[1] * (k // 2)] * 2
    xb = _blocked(x, ib)
    ring = sr.pack_ring(weight.reshape(weight.shape[0], -1), rows)
    out_size = cs.pixel_grid(xb.shape, (k, k), strides, pad, dilation, 8).out_size
    row_tile = tile(out_size)
    func = sr.ring_conv2d(xb.shape, ring.values.shape[0], rows, strides, pad, dilation,
                          weight.shape[0], (k, k), row_tile, ob)
    grid = cs.row_tile_layout(xb.shape, (k, k), strides, pad, dilation, row_tile)[0]
    arrays = [xb, ring.values, sr.ring_offsets(ring, grid), sr.padded_starts(ring, ob)]
    assert kernel_family(func) == "sparse_ring"
    result = _run_scheduled(func, arrays, (int(x.shape[0]), weight.shape[0] // ob, *out_size,
                                           ob))
    return _unblocked(result), sc.reference_conv2d(x, weight, strides, pad, dilation, 1)


@BUILD
@given(seed=st.integers(0, 10**6), kernel=st.sampled_from([1, 3]),
       size=st.integers(3, 11), stride=st.sampled_from([1, 2]),
       dilation=st.sampled_from([1, 2]), rows=st.sampled_from([2, 4, 8]),
       shape=st.sampled_from([(8, 4), (16, 8), (24, 8), (12, 4), (18, 1), (6, 2)]),
       batch=st.sampled_from([1, 2]), height=st.integers(1, 3), width=st.integers(1, 2),
       quantum=st.sampled_from([4, 8]), mask=st.sampled_from(["ubp", "random", "zero"]))
def test_ring_kernel_matches_numpy(seed, kernel, size, stride, dilation, rows, shape, batch,
                                   height, width, quantum, mask):
    """Any register tile (ragged against the output or not), ring turns shorter or
    longer than the output block, filters not a whole number of groups, batches, blocks
    at every offset and the last rows' moved up, rows with no block, no block at all."""
    filters, ob = shape
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((filters, 8, kernel, kernel)).astype("float32")
    matrix = weight.reshape(filters, -1)  # blocks down the [F, C * k * k] columns
    if mask == "ubp" and filters >= rows:
        matrix *= make_mask(matrix, UnalignedBlockSpec(rate=3, block=(rows, 1)))
    else:
        matrix *= rng.random(matrix.shape) < (0.2 if mask == "random" else 0.0)
    rows = min(rows, filters)
    x = rng.standard_normal((batch, 8, size, size)).astype("float32")
    _close(*run_ring(x, weight, rows, (stride, stride), (dilation, dilation), 4, ob,
                     lambda out: _any_row_tile(out, height, width, quantum)))


RING_THREADS_SCRIPT = """
import numpy as np, tvm
from tir_schedules import default_config, schedule_primfunc, sparse_ring as sr
from tir_schedules.lowering import cpu_pipeline
from tir_schedules.sparse_conv import reference_conv2d
from npas_tvm.targets import resolve_target
from npas_tvm.schemes import UnalignedBlockSpec, make_mask
rng = np.random.default_rng(0)
w = rng.standard_normal((128, 64)).astype("float32")
w *= make_mask(w, UnalignedBlockSpec(rate=3, block=(4, 1)))
x = rng.standard_normal((1, 64, 28, 28)).astype("float32")
ring = sr.pack_ring(w, 4)
spec = resolve_target("host")
from tir_schedules.sparse_csr import row_tile_layout
tile = sr.choose_ring_tile(28, 28, 4, 8, 16)
shape = (1, 8, 28, 28, 8)
f = sr.ring_conv2d(shape, ring.values.shape[0], 4, (1, 1), (0,) * 4, (1, 1), 128, (1, 1), tile, 8)
grid = row_tile_layout(shape, (1, 1), (1, 1), (0,) * 4, (1, 1), tile)[0]
scheduled = schedule_primfunc(f, default_config(spec))
assert "T.parallel" in str(scheduled)  # else this test would run one thread
lib = tvm.compile(scheduled, spec.tvm_target, tir_pipeline=cpu_pipeline())
args = [x.reshape(1, 8, 8, 28, 28).transpose(0, 1, 3, 4, 2), ring.values,
        sr.ring_offsets(ring, grid), sr.padded_starts(ring, 8)]
args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
out = tvm.runtime.empty((1, 16, 28, 28, 8), "float32", tvm.cpu())
ref = reference_conv2d(x, w[:, :, None, None], (1, 1), (0,) * 4, (1, 1), 1)
for _ in range(20):
    lib(*args, out)
    got = out.numpy().transpose(0, 1, 4, 2, 3).reshape(1, 128, 28, 28)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
print("ok")
"""


def test_ring_tiles_own_their_accumulators_across_threads():
    """Each parallel tile allocates its own ring and finished rows (TVMScript's plain
    allocations would stay outside the parallel loop, shared by the threads): the
    kernel run on 2 threads, 20 times, matches numpy."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TVM_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", RING_THREADS_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_ring_group_is_one_turn_where_it_divides_the_block():
    assert sr.ring_group(4, 8) == 4 and sr.ring_group(2, 8) == 2 and sr.ring_group(8, 8) == 8
    assert sr.ring_group(8, 4) == 8 and sr.ring_group(4, 1) == 4 and sr.ring_group(4, 6) == 12


@PACK
@given(out_h=st.integers(1, 112), out_w=st.integers(1, 112), rows=st.sampled_from([1, 2, 4, 8]),
       lanes=st.sampled_from([4, 8, 16]), registers=st.sampled_from([16, 32]))
def test_row_tile_fits_the_registers_and_covers_the_output(out_h, out_w, rows, lanes,
                                                           registers):
    tile = cs.choose_row_tile(out_h, out_w, rows, lanes, registers)
    vectors = tile.vectors
    assert rows * vectors + min(rows, vectors) + 1 <= registers
    assert tile.padded[0] >= out_h and tile.padded[1] >= out_w
    assert tile.padded[0] % tile.height == 0 and tile.padded[1] % tile.width == 0
    assert tile.width % tile.quantum == 0 and tile.quantum <= lanes
    assert tile.padded[0] < out_h + tile.height  # whole tiles, no tile of padding only
    assert tile.padded[1] < -(-out_w // tile.quantum) * tile.quantum + tile.width


def test_row_tile_choices_measured_on_avx2():
    """Zen3 (1 thread, 96->576 @14, UBP 4 x 1 at 10x, one run): 2 filters x 4 pixel
    vectors 0.082 ms, 1 x 14 0.125, 4 x 2 0.099; the accumulators, plus the fewer of a
    tap's broadcasts and input vectors, fit 16 registers (8 filters: one vector)."""
    tile = cs.choose_row_tile(14, 14, 2, 8, 16)
    assert tile.vectors >= 4 and tile.padded[1] == 16
    assert cs.choose_row_tile(14, 14, 8, 8, 16).vectors == 1


def test_ring_tile_leaves_half_the_registers_to_the_output_stage():
    """Zen3 (1 thread, UBP 4 x 1, 10th percentiles): 2-vector ring tiles against the
    3 a full register file allows, 96->576 @14 0.052/0.056 ms at 10x, 320->1280 @7
    0.073/0.088 (:func:`sparse_ring.choose_ring_tile`)."""
    assert cs.choose_row_tile(14, 14, 4, 8, 16).vectors == 3
    assert sr.choose_ring_tile(14, 14, 4, 8, 16).vectors == 2
    assert (sr.choose_ring_tile(7, 7, 4, 8, 16).height, sr.choose_ring_tile(7, 7, 4, 8, 16)
            .width) == (2, 8)
    for rows, registers in ((4, 16), (4, 32), (8, 32), (2, 16)):
        tile = sr.choose_ring_tile(28, 28, rows, 8, registers)
        assert rows * tile.vectors <= registers // 2
    assert sr.choose_ring_tile(14, 14, 8, 8, 16).vectors == 1  # a ring of 4 runs instead


# ------------------------------------------------------------------ through the pipeline


def _compile_plan(path, plan, tmp_path):
    import tvm

    from npas_tvm.compiler import import_onnx
    from npas_tvm.model_io import load_onnx
    from relay_passes import AnnotatePruning, ApplyPruning

    model = load_onnx(path)
    mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(
        import_onnx(model).mod)
    rows, _ = _lower_and_check(model, mod, tmp_path)
    return {row.name: row for row in rows}


FAMILY_PLAN = {"conv1.weight": PatternSpec(rate=3),
               "conv2.weight": UnalignedBlockSpec(rate=3, block=(4, 1)),
               "conv3.weight": PatternSpec(rate=2.25),        # depthwise 3x3
               "conv4.weight": UnstructuredSpec(rate=5),      # 3x3 stride 2
               "fc5.weight": UnstructuredSpec(rate=4)}


def test_family_plan_matches_onnxruntime(tmp_path):
    rows = _compile_plan(small_cnn(tmp_path / "m.onnx"), FAMILY_PLAN, tmp_path)
    assert rows["conv1.weight"].kernel == "pattern"
    assert rows["conv3.weight"].kernel == "pattern"
    assert rows["conv2.weight"].kernel == "unaligned_ring"  # CPUs: the ring of rows
    assert rows["conv4.weight"].kernel == rows["fc5.weight"].kernel == "csr"
    for row in rows.values():
        assert row.kept_macs <= row.computed_macs < row.dense_macs, row.name


def test_ring_conv_carries_its_fused_epilogue(tmp_path):
    """UBP 1x1 convs run the ring kernel with their bias, residual add, relu and swish
    fused into its output stage (no other loop nest in the kernel), against onnxruntime."""
    import tvm

    from npas_tvm.compiler import import_onnx
    from npas_tvm.model_io import load_onnx
    from npas_tvm.targets import resolve_target
    from relay_passes import AnnotatePruning, ApplyPruning, dense_cpu_passes

    g = make_graph((1, 16, 9, 9))
    skip = g.conv(32, kernel=1)
    g.relu6()
    g.conv(32, kernel=1)
    g.op("Add", skip)
    g.conv(24, kernel=1)
    g.op("Relu")
    before = g.conv(24, kernel=1)
    g.op("Sigmoid")
    g.op("Mul", before)  # swish: two epilogue stages read the bias add
    plan = {name: UnalignedBlockSpec(rate=3, block=(4, 1))
            for name in ("conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight")}
    path = g.save(tmp_path / "m.onnx")
    model = load_onnx(path)
    mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(
        import_onnx(model).mod)
    rows, _ = _lower_and_check(model, mod, tmp_path)
    kernels = {row.name: row.kernel for row in rows}
    assert set(kernels.values()) == {"unaligned_ring"} and len(kernels) == 4
    spec = resolve_target("host")
    with spec.tvm_target:
        lowered = tvm.transform.Sequential(dense_cpu_passes(spec))(mod)
    rings = {gv.name_hint: f for gv, f in lowered.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "npas_ring_rows" in str(f)}
    assert len(rings) == 4
    names = sorted(rings)  # bias adds; the residual add; a relu (conv1's output has two uses)
    assert any("_add_add" in name for name in names) and any("relu" in name for name in names)
    assert any("sigmoid_multiply" in name for name in names), names
    for func in rings.values():
        sch = tvm.s_tir.Schedule(func)
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
        assert names == [cs.PIXEL_PAD_BLOCK, sr.RING_INIT_BLOCK, sr.RING_ROWS_BLOCK,
                         sr.RING_OUT_BLOCK]


def test_unaligned_fc_and_odd_channels(tmp_path):
    g = make_graph((1, 12, 7, 7))
    g.conv(20, kernel=1)   # 20 output channels: an output block of 4
    g.op("Relu")
    g.conv(12, kernel=3, dilation=2)
    g.flatten()
    g.gemm(10)
    plan = {"conv1.weight": UnalignedBlockSpec(rate=2, block=(4, 1)),
            "conv2.weight": PatternSpec(rate=5, patterns=4),
            "fc3.weight": UnalignedBlockSpec(rate=2, block=(2, 1))}
    rows = _compile_plan(g.save(tmp_path / "m.onnx"), plan, tmp_path)
    assert all(row.kernel is not None for row in rows.values())
    assert rows["conv1.weight"].kernel == "unaligned_ring"  # output block 4 of 20
    assert rows["fc3.weight"].kernel == "unaligned_phases"  # 2-row blocks: tiles of 4


def test_simd_wide_unaligned_convs_of_both_forms_in_one_model(tmp_path):
    """SIMD-wide UBP blocks: a conv whose filters keep few weights runs as the gathered
    kernel's pieces on 16-lane vectors (writing NCHW16c), the next one the ring; on
    narrower vectors both run the ring. The model matches onnxruntime."""
    from npas_tvm.targets import resolve_target

    lanes = resolve_target("host").simd_lanes
    g = make_graph((1, 16, 10, 10))
    g.conv(64, kernel=1)   # 16 input channels: at most 16 weights a filter
    g.op("Relu")
    g.conv(32, kernel=1)   # 64 input channels at 2x: 32 a filter
    plan = {"conv1.weight": UnalignedBlockSpec(rate=2, block=(lanes, 1)),
            "conv2.weight": UnalignedBlockSpec(rate=2, block=(lanes, 1))}
    rows = _compile_plan(g.save(tmp_path / "m.onnx"), plan, tmp_path)
    assert rows["conv1.weight"].kernel == ("unaligned_gathered" if lanes >= 16
                                           else "unaligned_ring")
    assert rows["conv2.weight"].kernel == "unaligned_ring"


def test_block_based_convs_of_both_forms_in_one_model(tmp_path):
    """Short blocks in register tiles next to SIMD-wide ones gathered: each conv is
    packed and laid out in its own form's block (the tiles write NCHW8c or NCHW16c,
    the gathered 16 x 1 blocks NCHW16c), and the model matches onnxruntime."""
    g = make_graph((1, 16, 10, 10))
    g.conv(32, kernel=1)
    g.op("Relu")
    g.conv(32, kernel=1)
    g.op("Relu")
    g.conv(16, kernel=1)
    plan = {"conv1.weight": BlockBasedSpec(rate=3, block=(4, 1)),
            "conv2.weight": BlockBasedSpec(rate=2, block=(16, 1)),
            "conv3.weight": BlockBasedSpec(rate=3, block=(4, 1))}
    rows = _compile_plan(g.save(tmp_path / "m.onnx"), plan, tmp_path)
    assert rows["conv1.weight"].kernel == rows["conv3.weight"].kernel == "block_rows"
    assert rows["conv2.weight"].kernel == "gathered"


@pytest.mark.parametrize("target_name", ["host", "arm-cpu"])
def test_unaligned_gemm_form_follows_block_height(target_name):
    """A GEMM's UBP blocks go to phase planes of tiles of about their own height, at
    most the vector: one tap a block, whatever the SIMD width."""
    from npas_tvm.schemes import make_mask
    from npas_tvm.targets import resolve_target
    from relay_passes.sparse_kernels import LayerGeometry, UnalignedBlockKernel

    target = resolve_target(target_name)
    lanes = target.simd_lanes
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype("float32")
    geometry = LayerGeometry("matmul", "fc", weight.shape, (1, 48))
    kernel = UnalignedBlockKernel()
    with target.tvm_target:
        for rows in (2, 4, lanes, 2 * lanes):
            spec = UnalignedBlockSpec(rate=3, block=(rows, 1))
            pruned = weight * make_mask(weight, spec)
            packed = kernel.pack(pruned, spec, geometry)
            assert kernel.name == "unaligned_phases"
            assert packed.arrays.height == max(min(rows, lanes), 4)
            np.testing.assert_array_equal(packed.arrays.unpack(), pruned)


@pytest.mark.parametrize("target_name", ["host", "arm-cpu", "mali"])
def test_short_blocks_of_a_conv_take_register_tiles_on_cpus(target_name):
    """On CPUs a 1x1 conv's UBP blocks go to the ring kernel, vectorized along pixels
    (no lane wasted on a block's offset), a ring of at most 4 rows, and of half that
    where its tile would be one pixel vector; on 16-lane vectors SIMD-wide blocks of
    filters keeping few weights go to the gathered kernel as pieces. Aligned blocks
    shorter than the vector go to register tiles (the gathered kernel's vector would be
    the block's height); SIMD-wide aligned blocks, and OpenCL, keep the gathered kernel
    (UBP as pieces)."""
    from npas_tvm.schemes import make_mask
    from npas_tvm.targets import resolve_target
    from relay_passes.sparse_kernels import (PIECES_MAX_COLUMNS, PIECES_MIN_LANES,
                                             RING_MAX_ROWS, RING_MIN_VECTORS,
                                             BlockBasedKernel, LayerGeometry,
                                             UnalignedBlockKernel)

    target = resolve_target(target_name)
    lanes = 4 if target_name == "mali" else target.simd_lanes
    weight = np.random.default_rng(0).standard_normal((1280, 320, 1, 1)).astype("float32")
    geometry = LayerGeometry("conv2d", "conv", weight.shape, (1, 320, 7, 7), (1, 1),
                             (0, 0, 0, 0), (1, 1), 1)
    cpu = target_name != "mali"
    with target.tvm_target:
        for rows, rate in ((4, 10), (4, 2), (lanes, 10), (lanes, 20)):
            for kernel, spec in ((UnalignedBlockKernel(), UnalignedBlockSpec(rate=rate,
                                                                             block=(rows, 1))),
                                 (BlockBasedKernel(), BlockBasedSpec(rate=rate,
                                                                     block=(rows, 1)))):
                pruned = weight * make_mask(weight, spec)
                packed = kernel.pack(pruned, spec, geometry)
                assert packed.kept_macs <= packed.computed_macs
                if isinstance(kernel, UnalignedBlockKernel):
                    few = np.count_nonzero(pruned) < PIECES_MAX_COLUMNS * 1280
                    pieces = rows >= lanes >= PIECES_MIN_LANES and few
                    assert few == (rate == 20)  # 16 weights a filter at 20x, 32 at 10x
                    ring_runs = cpu and not pieces
                    assert kernel.name == ("unaligned_ring" if ring_runs
                                           else "unaligned_gathered")
                    if ring_runs:  # the tallest ring up to RING_MAX_ROWS with a tile
                        ring = min(rows, RING_MAX_ROWS)
                        while sr.choose_ring_tile(7, 7, ring, lanes, 16 if lanes == 8 else 32
                                                  ).vectors < RING_MIN_VECTORS:
                            ring //= 2
                        assert packed.arrays.rows == ring == min(rows, 4)
                else:
                    assert kernel.name == ("block_rows" if cpu and rows < lanes
                                           else "gathered")


def _ubp_weight(seed: int, out_features: int, in_features: int, rows: int, ubp: bool,
                rate: float) -> np.ndarray:
    """A GEMM weight pruned to UBP blocks of ``rows`` (where it has that many rows) or
    to a random mask."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_features, in_features)).astype("float32")
    if ubp and out_features >= rows:
        return weight * make_mask(weight, UnalignedBlockSpec(rate=rate, block=(rows, 1)))
    return weight * (rng.random(weight.shape) < 1 / rate)


@PACK
@given(seed=st.integers(0, 10**6), out_features=st.integers(1, 70),
       in_features=st.integers(1, 30), height=st.sampled_from([4, 8, 16]),
       ubp=st.booleans(), rate=st.sampled_from([2, 3, 5, 10]),
       tiles=st.sampled_from([1, 2, 4, 8]))
def test_phase_tiles_pack_back_to_the_weight(seed, out_features, in_features, height, ubp,
                                             rate, tiles):
    """Every (phase, group) tile is in exactly one loop (spare rows only for padding
    tiles), a loop runs as many taps as its fullest tile, the tiles sorted by count go
    together, the loops are dealt to runs of every count, and the taps unpacked give the
    weight back: one tap a block for a UBP mask, every nonzero covered for any other."""
    weight = _ubp_weight(seed, out_features, in_features, height, ubp, rate)
    packed = su.pack_phase_tiles(weight, height, tiles)
    np.testing.assert_array_equal(packed.unpack(), weight)
    assert packed.tiles == tiles and packed.rows.size == packed.counts.size * tiles
    real = packed.rows[packed.rows < height * packed.plane_rows]
    assert sorted(real) == sorted(s * packed.plane_rows + g + 1 for s in range(height)
                                  for g in range(packed.groups))
    assert len(set(packed.rows.tolist())) == packed.rows.size  # spare rows too
    assert packed.values.shape[0] == max(1, int(packed.counts.sum()) * tiles)
    assert (np.diff(packed.offsets) == packed.counts[:-1] * tiles).all()
    ordered = np.sort(packed.counts)  # loops of tiles sorted by count (little padding),
    assert (packed.counts == np.concatenate(  # dealt to runs for the parallel threads
        [ordered[j::su.LOOP_BUCKETS] for j in range(su.LOOP_BUCKETS)])).all()
    if ubp and out_features >= height:
        assert packed.kept_taps() * height == np.count_nonzero(weight)


def _run_phase_tiles(weight: np.ndarray, x: np.ndarray, height: int, tiles: int,
                     row_tile: int) -> np.ndarray:
    """The phase-tile GEMM of ``weight`` built for the host with its template and run
    on ``x``."""
    from tir_schedules import kernel_family

    packed = su.pack_phase_tiles(weight, height, tiles)
    func = su.phase_tiles_dense(x.shape[0], weight.shape[1], weight.shape[0],
                                packed.values.shape[0], packed.counts.size, tiles, height,
                                packed.groups, row_tile)
    assert kernel_family(func) == "sparse_phase_tiles"
    arrays = [x, packed.values, packed.columns, packed.offsets, packed.counts, packed.rows]
    return _run_scheduled(func, arrays, (x.shape[0], weight.shape[0]))


@BUILD
@given(seed=st.integers(0, 10**6), batch=st.sampled_from([1, 2, 3, 4]),
       out_features=st.integers(1, 40), in_features=st.integers(1, 40),
       height=st.sampled_from([4, 8, 16]), tiles=st.sampled_from([1, 2, 4]),
       ubp=st.booleans())
def test_phase_tiles_dense_matches_numpy(seed, batch, out_features, in_features, height,
                                         tiles, ubp):
    """Any batch (in row tiles dividing it), ragged outputs, tiles of any height, loops
    of any tile count, and masks with empty tiles."""
    weight = _ubp_weight(seed, out_features, in_features, height, ubp, 2.5)
    x = np.random.default_rng(seed + 1).standard_normal((batch, in_features)).astype("float32")
    row_tile = su.phase_row_tile(batch, tiles, 16)
    assert batch % row_tile == 0 and (tiles * row_tile + row_tile + 1 <= 16 or row_tile == 1)
    got = _run_phase_tiles(weight, x, height, tiles, row_tile)
    _close(got, x.astype(np.float64) @ weight.T)


PHASE_THREADS_SCRIPT = """
import numpy as np, tvm
from tir_schedules import default_config, schedule_primfunc, sparse_unaligned as su
from tir_schedules.lowering import cpu_pipeline
from npas_tvm.targets import resolve_target
from npas_tvm.schemes import UnalignedBlockSpec, make_mask
rng = np.random.default_rng(0)
w = rng.standard_normal((1000, 512)).astype("float32")
w *= make_mask(w, UnalignedBlockSpec(rate=3, block=(8, 1)))
x = rng.standard_normal((2, 512)).astype("float32")
p = su.pack_phase_tiles(w, 8)
f = su.phase_tiles_dense(2, 512, 1000, p.values.shape[0], p.counts.size, p.tiles, 8, p.groups,
                         su.phase_row_tile(2, p.tiles, 16))
scheduled = schedule_primfunc(f, default_config(resolve_target("host")))
assert "T.parallel" in str(scheduled)  # else this test would run one thread
lib = tvm.compile(scheduled, resolve_target("host").tvm_target, tir_pipeline=cpu_pipeline())
args = [tvm.runtime.tensor(np.ascontiguousarray(a))
        for a in (x, p.values, p.columns, p.offsets, p.counts, p.rows)]
out = tvm.runtime.empty((2, 1000), "float32", tvm.cpu())
for _ in range(20):
    lib(*args, out)
    assert np.abs(out.numpy() - x @ w.T).max() < 1e-3 * np.abs(x @ w.T).max()
print("ok")
"""


def test_phase_tiles_own_their_accumulators_across_threads():
    """Each parallel loop of tiles allocates its own accumulators: the kernel run on 2
    threads, 20 times, matches numpy."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TVM_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", PHASE_THREADS_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg_cifar", "resnet18", "mobilenet_v2",
                                  "mobilenet_v3_large"])
def test_zoo_models_with_the_family_schemes(zoo_onnx, tmp_path, capsys, name):
    """All four schemes of the family on one model, compiled by ``compile --npas
    PLAN.json`` and checked against onnxruntime on the pruned ONNX: 3x3 convs take
    patterns (every third, filter pruning), 1x1 convs unaligned blocks (every fourth
    unstructured, every fourth filter pruning), FC layers unstructured."""
    import json

    import onnx

    from npas_tvm.cli import main

    path = zoo_onnx(name)
    layers, seen = {}, {"3x3": 0, "1x1": 0}
    for init in onnx.load(path).graph.initializer:
        dims = tuple(init.dims)
        if len(dims) == 4 and dims[2:] == (3, 3) and dims[1] > 1:
            seen["3x3"] += 1
            layers[init.name] = ({"scheme": "filter", "rate": 2} if seen["3x3"] % 3 == 0
                                 else {"scheme": "pattern", "rate": 3})
        elif len(dims) == 4 and dims[2:] == (1, 1) and dims[0] >= 8:
            seen["1x1"] += 1
            layers[init.name] = [{"scheme": "filter", "rate": 2},
                                 {"scheme": "unstructured", "rate": 4},
                                 {"scheme": "unaligned_block", "rate": 3, "block": [4, 1]},
                                 {"scheme": "unaligned_block", "rate": 3, "block": [4, 1]},
                                 ][seen["1x1"] % 4]
        elif len(dims) == 2:
            layers[init.name] = {"scheme": "unstructured", "rate": 5}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "npas-plan", "version": 1, "layers": layers}))
    code = main(["compile", path, "--npas", str(plan), "-o", str(tmp_path / "m.so"),
                 "--check"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert ": OK" in out and "Traceback" not in err
    kernels = {"pattern": "pattern", "unaligned_block": "unaligned_",
               "unstructured": "csr", "filter": "filters"}
    for scheme in {layer["scheme"] for layer in layers.values()} - {"filter"}:
        assert kernels[scheme] in out, (scheme, out)
    # a filter-pruned layer is cut out, or (its channels meet a depthwise conv or a
    # residual add, as everywhere in MobileNetV2) keeps its zero filters with a warning
    assert "filters" in out or "keeps its zero filters" in err, out + err


# ------------------------------------------------------------------ OpenCL on PoCL


@pytest.mark.parametrize("plan", [
    {"conv1.weight": PatternSpec(rate=3)},
    {"conv1.weight": UnstructuredSpec(rate=4)},
    {"conv2.weight": UnalignedBlockSpec(rate=2, block=(4, 1))},
], ids=["pattern", "csr", "unaligned"])
def test_family_on_pocl(tmp_path, plan):
    from test_opencl_pocl import _sparse_on_pocl

    g = make_graph((1, 8, 9, 9))
    g.conv(16, kernel=3)
    g.op("Relu")
    g.conv(16, kernel=1)
    rows, runner, result = _sparse_on_pocl(g.save(tmp_path / "m.onnx"), plan, "mali",
                                           tmp_path)
    assert [row.kernel for row in rows] != [None] and all(row.kernel for row in rows)
    assert result.ok, result.report()
    assert "__kernel void" in runner.source


def test_pattern_plan_is_satisfied_after_pruning():
    rng = np.random.default_rng(0)
    weight = _pattern_weight(rng, 8, 8, 3, 8)
    assert satisfies(weight, PatternSpec(rate=3))


@PACK
@given(lanes=st.sampled_from([4, 8, 16]), registers=st.sampled_from([16, 32]),
       size=st.integers(3, 64), pad=st.integers(0, 2))
def test_entry_form_fits_the_registers_and_costs_least(lanes, registers, size, pad):
    """The entry form's planes and tile: whole vectors, a pattern's planes'
    accumulators plus the inputs fit the registers, and no wider tile of the same
    planes that fits and spills alike computes as few products (it would cost less)."""
    padding = (pad, pad, pad, pad)
    form = sp.choose_entry_form(lanes, registers, size, size, padding)
    vectors = form.tile // lanes
    assert form.tile % lanes == 0 and vectors >= 1
    held = 3 * vectors + 10 if form.fold_rows else 4 * vectors + 2
    assert vectors == 1 or held <= registers
    live = lambda f: sp._entry_layout(f, size, size, padding, (1, 1), lanes)[2]  # noqa: E731
    spills = lambda f: sp.planes_spill(f, lanes, registers)  # noqa: E731
    fitting = [sp.EntryForm(fold, lanes * v) for fold, most in
               ((False, max(1, (registers - 2) // 4)), (True, max(1, (registers - 10) // 3)))
               for v in range(1, most + 1)]
    assert all(live(other) > live(form) for other in fitting
               if other.fold_rows == form.fold_rows and other.tile > form.tile
               and spills(other) == spills(form))


def test_entry_form_choices_measured_on_avx512():
    """The two layers of the kernel benchmark: 14x14 takes column planes (pitch 16,
    two tiles of 112), 28x28 entry planes (pitch 29)."""
    assert sp.choose_entry_form(16, 32, 14, 14) == sp.EntryForm(True, 112)
    assert sp.choose_entry_form(16, 32, 28, 28) == sp.EntryForm(False, 48)


def test_entry_form_choices_measured_on_avx2():
    """With 16 registers of 8 lanes, entry planes in tiles of 24 (3 vectors, 12 FMA
    chains, the other planes in L1 between patterns) on 14x14, 28x28 and 56x56: on
    Zen3 they ran 1.3-1.6x faster than the 1-vector tile that holds all 9 planes, and
    than column planes in tiles of 16; and no slower than tiles of 16 at 5-10x."""
    for size in (14, 28, 56):
        assert sp.choose_entry_form(8, 16, size, size) == sp.EntryForm(False, 24)


@pytest.mark.parametrize("target_name, lanes", [("host", 8), ("host", 16), ("arm-cpu", 4),
                                                ("mali", 4)])
def test_pattern_form_follows_kernels_per_loop(target_name, lanes, monkeypatch):
    """Where the entry planes spill (AVX2) few kernels a pattern loop take the direct
    form, many the entry form; with 32 registers (AVX-512, NEON) stride 1 always takes
    the entry form; stride 2 and OpenCL the direct form."""
    import relay_passes.sparse_kernels as sk
    from npas_tvm.targets import resolve_target

    monkeypatch.setattr(sk, "_target_lanes", lambda: lanes)
    emitted = []

    class Recorder:
        def call_te(self, fn, *args, **kwargs):
            emitted.append(fn.__name__)

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 32, 3, 3)).astype("float32")
    cpu = target_name != "mali"
    with resolve_target(target_name).tvm_target:
        for rate, patterns, stride, entries in ((2.25, 2, 1, cpu),  # 16 kernels a loop
                                                (10, 8, 1, cpu and lanes != 8),  # 0.9
                                                (2.25, 2, 2, False)):
            spec = PatternSpec(rate=rate, patterns=patterns)
            geometry = sk.LayerGeometry("conv2d", "conv", weight.shape, (1, 32, 12, 12),
                                        (stride, stride), (1, 1, 1, 1), (1, 1), 1)
            kernel = sk.PatternKernel()
            packed = kernel.pack(weight * make_mask(weight, spec), spec, geometry)
            kernel.conv2d(Recorder(), None, lanes, packed, geometry)
            assert emitted.pop() == ("pattern_entries_conv2d" if entries
                                     else "pattern_conv2d"), (rate, stride)


def test_entry_form_pays_with_enough_kernels_per_loop():
    assert sp.entries_form_pays((1, 1), "x86", 5.0, spills=True)
    assert not sp.entries_form_pays((1, 1), "x86", 4.9, spills=True)
    assert sp.entries_form_pays((1, 1), "arm", 0.5, spills=False)
    assert not sp.entries_form_pays((2, 2), "x86", 50.0)
    assert not sp.entries_form_pays((1, 1), "opencl", 50.0)
    rng = np.random.default_rng(0)
    weight = _pattern_weight(rng, 8, 8, 3, 8)
    packed = sp.pack_pattern(weight)
    assert sp.kernels_per_loop(packed) == np.count_nonzero(weight.any(axis=(2, 3))) / (
        8 * len(packed.patterns))


def test_pattern_convs_of_both_forms_in_one_model(tmp_path):
    """A pattern conv with many kernels a loop (the entry form on every CPU) next to
    one with few (the direct form where the entry planes spill), against onnxruntime."""
    g = make_graph((1, 16, 12, 12))
    g.conv(32)
    g.op("Relu")
    g.conv(32)
    plan = {"conv1.weight": PatternSpec(rate=2.25, patterns=2),  # 8 kernels a loop
            "conv2.weight": PatternSpec(rate=10)}                 # 0.45
    rows = _compile_plan(g.save(tmp_path / "m.onnx"), plan, tmp_path)
    assert rows["conv1.weight"].kernel == rows["conv2.weight"].kernel == "pattern"
