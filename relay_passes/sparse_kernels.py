"""Which sparse kernel runs a layer of each scheme: the registry that lowering reads.

A scheme (``npas_tvm.schemes``: its spec, mask and checker) becomes fast code through a
:class:`SparseKernel`: a packer (pruned weight -> compact arrays) and emitters that
replace the layer's ``conv2d`` / ``matmul`` by a ``call_tir`` of a kernel from
``tir_schedules/`` whose compact arrays are constants. Registering one is all a new
scheme needs for ``--npas``::

    register_sparse_kernel("my_scheme", MySparseKernel(), families=("x86", "arm"))

``block_punched`` and ``block_based`` share :class:`GatheredKernel`: in both, the
filters of a block of output channels keep the same input taps, so one packed format
(per block: its kept taps and a [taps, block] weight matrix) and one kernel serve them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from npas_tvm.schemes import DEPTHWISE, SchemeSpec, get_scheme, register_hook

CPU_FAMILIES = ("x86", "arm")
ALL_FAMILIES = (*CPU_FAMILIES, "opencl")


@dataclass(frozen=True)
class LayerGeometry:
    """What a kernel needs to know of the layer it replaces (from the Relax call)."""

    op: str                         # "conv2d" or "matmul"
    kind: str                       # the schemes' layer kind
    weight_shape: tuple[int, ...]   # in the schemes' layout
    data_shape: tuple[int, ...]     # the call's data argument (conv: NCHW, before blocking)
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def output_size(self) -> tuple[int, int]:
        """(OH, OW) of a conv."""
        _, _, h, w = self.data_shape
        _, _, kh, kw = self.weight_shape
        oh = (h + self.padding[0] + self.padding[2] - (kh - 1) * self.dilation[0] - 1) \
            // self.strides[0] + 1
        ow = (w + self.padding[1] + self.padding[3] - (kw - 1) * self.dilation[1] - 1) \
            // self.strides[1] + 1
        return oh, ow

    def output_pixels(self) -> int:
        """Output positions per weight use (conv: N*OH*OW; matmul: the rows of data)."""
        if self.op == "matmul":
            return int(np.prod(self.data_shape[:-1]))
        oh, ow = self.output_size()
        return self.data_shape[0] * oh * ow

    def dense_macs(self) -> int:
        return int(np.prod(self.weight_shape)) * self.output_pixels()


@dataclass(frozen=True)
class Packed:
    """A layer's packed weight, with what the report needs."""

    arrays: Any                 # the kernel's own packed object
    kept_macs: int              # multiply-adds of the nonzero weights, one inference
    computed_macs: int          # what the kernel executes (zeros it stores included)


def packed_gathered(weight: np.ndarray, block: int, geometry: LayerGeometry,
                    wrap: Callable[[Any], Any] | None = None) -> Packed:
    """``weight`` in the gathered format with tiles of ``block`` filters (``wrap``
    marks which form of a kernel it is for), with its kept and computed MACs."""
    from tir_schedules.sparse_conv import pack_gathered

    gathered = pack_gathered(weight, block, groups=geometry.groups)
    pixels = geometry.output_pixels()
    return Packed(gathered if wrap is None else wrap(gathered),
                  int(np.count_nonzero(weight)) * pixels,
                  gathered.kept_macs_per_pixel() * pixels)


@dataclass(frozen=True)
class _OtherForm:
    """Arrays packed for another kernel's form than the scheme's own (UBP's gathered
    pieces, short aligned blocks' row tiles): the scheme's ``conv2d`` hands them on."""

    arrays: Any

    @staticmethod
    def unwrapped(packed: Packed) -> Packed:
        return Packed(packed.arrays.arrays, packed.kept_macs, packed.computed_macs)


class SparseKernel:
    """The interface of a sparse kernel for one or more schemes (subclass it).

    ``unsupported`` says why a layer cannot use it (None: it can); ``pack`` turns the
    pruned weight (schemes' layout) into compact arrays; ``output_block`` is the channel
    block of the conv kernel's ``NCHW{c}c`` output (where it is not the block of the
    neighbours' layout, the lowering adds a transform); ``conv2d``/``matmul`` emit the
    call.
    """

    name = "sparse"
    relative_speed = 1.0
    """Its FLOP rate on the kept weights relative to the dense kernel's on the whole
    layer (measured by ``benchmarks/kernels.py``); the compile table's estimate."""

    def unsupported(self, geometry: LayerGeometry, spec: SchemeSpec) -> str | None:
        return None

    def output_block(self, spec: SchemeSpec) -> int:
        raise NotImplementedError

    def pack(self, weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> Packed:
        raise NotImplementedError

    def conv2d(self, bb, data, in_block: int, packed: Packed, geometry: LayerGeometry):
        """The call (not yet emitted) of the conv on ``data`` in ``NCHW{in_block}c``; its
        output is ``NCHW{c}c`` with ``c = output_block(spec)``."""
        raise NotImplementedError

    def matmul(self, bb, data, packed: Packed, geometry: LayerGeometry):
        """The call (not yet emitted) of ``data [rows, K] x weight^T`` -> ``[rows, M]``."""
        raise NotImplementedError


def register_sparse_kernel(scheme: str, kernel: SparseKernel,
                           families: Sequence[str] = CPU_FAMILIES) -> None:
    """Make ``kernel`` run ``scheme``'s layers on targets of ``families`` (x86, arm...)."""
    for family in families:
        register_hook(scheme, f"sparse_kernel:{family}", kernel)


def sparse_kernel_for(scheme: str, family: str) -> SparseKernel | None:
    """The kernel registered for ``scheme`` on ``family``, or None."""
    return get_scheme(scheme).hooks.get(f"sparse_kernel:{family}")


class GatheredKernel(SparseKernel):
    """Blocks of filters sharing their kept taps (block_punched, block_based).

    Packs with ``tir_schedules.sparse_conv.pack_gathered`` (block = the spec's rows)
    and emits ``sparse_conv2d_nchwc`` / ``sparse_dense``: vectorized along the block's
    filters, each kept input value loaded once per output pixel for all of them.
    """

    name = "gathered"
    relative_speed = 0.75  # 3x3 128@28, 1 thread: 2.8x faster at 3x, 3.3x at 5x, 7x at 10x

    def output_block(self, spec: SchemeSpec) -> int:
        return int(spec.block[0])

    def unsupported(self, geometry: LayerGeometry, spec: SchemeSpec) -> str | None:
        return self._unsupported_for_block(geometry, self.output_block(spec))

    @staticmethod
    def _unsupported_for_block(geometry: LayerGeometry, block: int) -> str | None:
        if geometry.op == "matmul":
            return None
        if geometry.kind == DEPTHWISE:
            return "depthwise: a block's filters read different channels"
        per_group = geometry.out_channels // geometry.groups
        if per_group % block:
            what = "per group " if geometry.groups > 1 else ""
            return (f"{geometry.out_channels} output channels {what}are not a multiple of "
                    f"the block's {block} rows (the kernel's output block)")
        return None

    def pack(self, weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> Packed:
        # the scheduled kernel stops each block at its own tap count
        return packed_gathered(weight, self.output_block(spec), geometry)

    @staticmethod
    def _constants(packed: Packed):
        from tvm import relax

        arrays = packed.arrays
        return [relax.const(arrays.values), relax.const(arrays.taps),
                relax.const(arrays.counts)]

    def conv2d(self, bb, data, in_block: int, packed: Packed, geometry: LayerGeometry):
        from tir_schedules.sparse_conv import sparse_conv2d_nchwc

        return bb.call_te(sparse_conv2d_nchwc, data, *self._constants(packed),
                          list(geometry.strides), list(geometry.padding),
                          list(geometry.dilation), geometry.out_channels,
                          kernel_size=list(geometry.weight_shape[2:]),
                          primfunc_name_hint="sparse_conv2d_nchwc")

    def matmul(self, bb, data, packed: Packed, geometry: LayerGeometry):
        from tvm import relax

        from tir_schedules.sparse_conv import pad_to_chains, sparse_dense

        arrays = packed.arrays
        chains = _gemm_chains(arrays, geometry) if _target_family() in CPU_FAMILIES else 1
        values, taps = pad_to_chains(arrays.values, arrays.gemm_taps(), chains)
        return bb.call_te(sparse_dense, data, relax.const(values), relax.const(taps),
                          relax.const(arrays.counts), geometry.out_channels, chains,
                          primfunc_name_hint="sparse_dense")


GATHERED = GatheredKernel()
register_sparse_kernel("block_punched", GATHERED, ALL_FAMILIES)


def _target_lanes() -> int:
    """fp32 lanes of the target being compiled (the pass runs inside ``with target``)."""
    from tvm.target import Target

    target = Target.current(allow_none=True)
    if target is None:
        return 8
    if {"gpu", "arm_cpu", "opencl"} & set(target.keys):
        return 4
    from npas_tvm.targets import detect_host_cpu

    return detect_host_cpu().fp32_lanes


def _target_family() -> str:
    """x86, arm or opencl: the family of the target being compiled."""
    from tvm.target import Target

    from npas_tvm.targets import schedule_family

    return schedule_family(Target.current(allow_none=True))


def _gemm_chains(gathered, geometry: LayerGeometry) -> int:
    """Partial sums per block of a gathered GEMM on a CPU target (``dense_chains``)."""
    from tir_schedules.sparse_conv import dense_chains

    return dense_chains(int(np.prod(geometry.data_shape[:-1])),
                        int(gathered.values.shape[2]), _target_lanes())


def _target_registers(lanes: int) -> int:
    """Vector registers of the target's SIMD unit (32 for AVX-512 and NEON)."""
    return 16 if lanes == 8 else 32


def call_primfunc(bb, func, name: str, data, constants: Sequence[np.ndarray],
                  out_shape: Sequence[int]):
    """``call_tir`` of a hand-written PrimFunc on ``data`` and ``constants`` (what
    ``bb.call_te`` is for a TE function); a stand-in builder may offer its own."""
    from tvm import relax

    if not isinstance(bb, relax.BlockBuilder):
        return bb.call_primfunc(func, data, constants, out_shape)
    func = func.without_attr("global_symbol") if "global_symbol" in (func.attrs or {}) else func
    gvar = bb.add_func(func, name)
    return relax.call_tir(gvar, [data, *(relax.const(a) for a in constants)],
                          out_ty=relax.TensorType([int(v) for v in out_shape], "float32"))


class PixelKernel(SparseKernel):
    """Sparse convs vectorized along output pixels (``tir_schedules.sparse_csr``).

    They write ``NCHW{c}c`` with ``c`` the block the layout pass gives the layer's
    output channels (the SIMD width where it divides them), so their neighbours need
    no transform; ``output_block`` reports the block of the last layer emitted, which
    the lowering asks right after ``conv2d``.
    """

    def __init__(self):
        self._block = 1

    def output_block(self, spec: SchemeSpec) -> int:
        return self._block

    def _output_block_of(self, geometry: LayerGeometry) -> int:
        """The layer's output channel block on the current target, kept for
        ``output_block``."""
        from relay_passes.layout import channel_block

        self._block = channel_block(geometry.out_channels, _target_lanes()) or 1
        return self._block

    def _choose(self, geometry: LayerGeometry, rows: int) -> tuple[int, int]:
        """(pixel tile, output block) for the layer on the current target."""
        from tir_schedules.sparse_csr import PixelGrid, choose_pixel_tile

        lanes = _target_lanes()
        _, channels, height, width = geometry.data_shape
        grid = PixelGrid(channels, height, width, tuple(geometry.weight_shape[2:]),
                         geometry.strides, geometry.padding, geometry.dilation, 16)
        tile = choose_pixel_tile(grid.out_size[0], grid.row_pitch, rows, lanes,
                                 _target_registers(lanes))
        return tile, self._output_block_of(geometry)


class PatternKernel(PixelKernel):
    """Pattern-pruned 3x3 convs: FKW storage, one code path per pattern
    (``tir_schedules.sparse_pattern``). CPUs run the entry form (per-entry 1x1 products,
    then constant shifts) for stride 1 where the pattern loops hold enough kernels to pay
    for its planes (``entries_form_pays``), else the direct form."""

    name = "pattern"
    # 3x3 128@28, 1 thread: 0.62 of dense's FLOP rate at 3x (1.86x faster), 0.50 at 5x,
    # 0.36 at 10x; the middle one (a single figure per kernel)
    relative_speed = 0.5

    def unsupported(self, geometry: LayerGeometry, spec: SchemeSpec) -> str | None:
        if geometry.op != "conv2d" or tuple(geometry.weight_shape[2:]) != (3, 3):
            return "the pattern kernel runs 3x3 convolutions only"
        return None

    def pack(self, weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> Packed:
        from tir_schedules.sparse_pattern import PATTERN_SIZE, pack_pattern

        packed = pack_pattern(weight, groups=geometry.groups)
        pixels = geometry.output_pixels()
        return Packed(packed, int(np.count_nonzero(weight)) * pixels,
                      packed.kept_kernels() * PATTERN_SIZE * pixels)

    def conv2d(self, bb, data, in_block: int, packed: Packed, geometry: LayerGeometry):
        from tvm import relax

        from tir_schedules.sparse_pattern import (choose_entry_form, entries_form_pays,
                                                  kernels_per_loop, pattern_conv2d,
                                                  pattern_entries_conv2d, planes_spill)

        arrays = packed.arrays
        args = [data, relax.const(arrays.weights), relax.const(arrays.channels),
                relax.const(arrays.counts), relax.const(arrays.position),
                list(arrays.patterns), list(geometry.strides), list(geometry.padding),
                list(geometry.dilation)]
        lanes = _target_lanes()
        registers = _target_registers(lanes)
        _, _, height, width = geometry.data_shape
        form = choose_entry_form(lanes, registers, height, width, geometry.padding,
                                 geometry.dilation)
        if entries_form_pays(geometry.strides, _target_family(), kernels_per_loop(arrays),
                             planes_spill(form, lanes, registers)):
            return bb.call_te(pattern_entries_conv2d, *args, form.tile,
                              self._output_block_of(geometry), lanes,
                              form.fold_rows, primfunc_name_hint="sparse_pattern_conv2d")
        tile, block = self._choose(geometry, 1)
        return bb.call_te(pattern_conv2d, *args, tile, block,
                          primfunc_name_hint="sparse_pattern_conv2d")


class RowsKernel(PixelKernel):
    """Row-sparse convs and GEMMs (``tir_schedules.sparse_csr``): CSR for unstructured
    masks (one row per tile), tiles of a few rows for unaligned blocks."""

    def __init__(self, name: str, candidates: Sequence[int]):
        super().__init__()
        self.name = name
        self.candidates = tuple(candidates)
        # 1 thread: CSR 1.1x faster than dense at 3x and 5x (3x3 128@28), 2.2x at 10x;
        # row tiles 1.6-1.8x at 5x (1x1 96->576, 320->1280)
        self.relative_speed = 0.25 if self.candidates == (1,) else 0.35

    @staticmethod
    def _row_tile(geometry: LayerGeometry, rows: int, choose=None):
        """The register tile of ``rows`` filter rows on the current target, or None:
        ``choose``'s (:func:`.sparse_csr.choose_row_tile`'s where None)."""
        from tir_schedules.sparse_csr import choose_row_tile

        lanes = _target_lanes()
        return (choose or choose_row_tile)(*geometry.output_size(), rows, lanes,
                                           _target_registers(lanes))

    def _rows(self, weight: np.ndarray, geometry: LayerGeometry) -> int:
        from tir_schedules.sparse_csr import choose_rows, row_tile_cost, straddle_entries

        if geometry.op == "matmul":  # bound by weight bytes: an index + R weights per tap
            return min(self.candidates, key=lambda r: (straddle_entries(weight, r) * (1 + r), r))

        def per_tap(rows: int) -> float | None:
            tile = self._row_tile(geometry, rows)
            return None if tile is None else row_tile_cost(tile, rows)

        return choose_rows(weight, self.candidates, geometry.groups, per_tap)

    def pack(self, weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> Packed:
        return packed_gathered(weight, self._rows(weight, geometry), geometry)

    def conv2d(self, bb, data, in_block: int, packed: Packed, geometry: LayerGeometry):
        from tir_schedules.sparse_csr import rows_conv2d, tiled_rows_conv2d

        rows = packed.arrays.block
        args = [data, *GatheredKernel._constants(packed), list(geometry.strides),
                list(geometry.padding), list(geometry.dilation), geometry.out_channels,
                list(geometry.weight_shape[2:])]
        if rows == 1:  # CSR: the flat form (see rows_conv2d)
            tile, block = self._choose(geometry, 1)
            return bb.call_te(rows_conv2d, *args, tile, block,
                              primfunc_name_hint="sparse_rows_conv2d")
        tile = self._row_tile(geometry, rows)
        if tile is None:
            raise ValueError(f"no register tile holds {rows} filter rows")
        fields = [tile.quantum, tile.height, tile.width, *tile.padded]  # call_te: no objects
        return bb.call_te(tiled_rows_conv2d, *args, fields, self._output_block_of(geometry),
                          primfunc_name_hint="sparse_rows_conv2d")

    def matmul(self, bb, data, packed: Packed, geometry: LayerGeometry):
        return GATHERED.matmul(bb, data, packed, geometry)


class BlockBasedKernel(GatheredKernel):
    """Block-based pruning (``block_based``): the gathered kernel, except for convs on
    CPUs whose blocks are shorter than the SIMD vector: there the gathered kernel's
    vector is the block's height (4 of 8 or 16 lanes for 4 x 1 blocks), and the
    register tiles of :class:`RowsKernel` with ``R`` = the block's rows (vectorized
    along output pixels, aligned tiles: no block straddles two) use whole vectors.
    Measured (4 x 1 blocks, 1 thread, Zen3): 1x1 96->576 @14 at 3x 0.161 ms against
    0.290, at 10x 0.084 against 0.113; 320->1280 @7 at 5x 0.165 against 0.329. SIMD-wide
    blocks stay gathered (8 x 1 at 5x on 96->576 @14: 0.103 against 0.117)."""

    def __init__(self):
        self.rows = RowsKernel("block_rows", (1,))
        self.name = "gathered"
        self._emitted_rows = False  # the form of the last conv emitted (output_block)

    def _rows_form(self, geometry: LayerGeometry, spec: SchemeSpec) -> bool:
        rows = int(spec.block[0])
        return (geometry.op == "conv2d" and _target_family() in CPU_FAMILIES
                and 2 <= rows < _target_lanes() and geometry.kind != DEPTHWISE
                and self.rows._row_tile(geometry, rows) is not None)

    def unsupported(self, geometry: LayerGeometry, spec: SchemeSpec) -> str | None:
        if self._rows_form(geometry, spec):
            return None
        return self._unsupported_for_block(geometry, int(spec.block[0]))

    def output_block(self, spec: SchemeSpec) -> int:
        """The block of the conv just emitted (the lowering asks right after it)."""
        return self.rows.output_block(spec) if self._emitted_rows else int(spec.block[0])

    def pack(self, weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> Packed:
        if not self._rows_form(geometry, spec):  # not output_block: the last conv's
            self.name = "gathered"
            return packed_gathered(weight, int(spec.block[0]), geometry)
        self.name = self.rows.name
        return packed_gathered(weight, int(spec.block[0]), geometry, _OtherForm)

    def conv2d(self, bb, data, in_block: int, packed: Packed, geometry: LayerGeometry):
        self._emitted_rows = isinstance(packed.arrays, _OtherForm)
        if not self._emitted_rows:
            return super().conv2d(bb, data, in_block, packed, geometry)
        return self.rows.conv2d(bb, data, in_block, _OtherForm.unwrapped(packed), geometry)


RING_MIN_VECTORS = 2
"""The ring kernel's register tile holds at least this many pixel vectors: the ring's
costs per filter row (its loop's exit, the finished row's move) are paid per tile, and a
one-vector tile has three times the tiles. Taller blocks run a shorter ring, each block
two (four, ...) taps. 1x1 96->576 @14 in 8 x 1 blocks on AVX2 (a ring of 8 rows holds
one vector; Zen3, 1 thread; time over aligned 8 x 1 blocks'): a ring of 8 rows 1.77 /
1.93 at 5x / 10x; a ring of 4 rows 1.07 / 1.20 / 1.57 at 3x / 5x / 10x; register tiles
1.38 / 1.39 / 1.66."""

RING_MAX_ROWS = 4
"""The ring's most rows: taller blocks run as two or more taps of a ring of 4 (or of
the largest half that has a register tile, :data:`RING_MIN_VECTORS`). The ring's tile
then holds more pixel vectors, so its per-row costs serve more pixels, and its finished
rows leave in groups of 4 channels. On AVX-512 (Xeon, 1 thread, 10th percentiles of 15
interleaved rounds, time over aligned blocks' of the same height) 1x1 96->576 @14: 8 x 1
blocks in a ring of 4 rows 0.99 / 0.92 / 0.89 at 2/5/10x, in a ring of 8 1.07 / 1.10 /
1.05 (320->1280 @7 at 3/10x: 0.88 / 0.83 against 0.89 / 0.88); 16 x 1 blocks 1.36 /
1.55 / 1.81 / 2.22 at 2/3/5/10x against 1.43 / 1.64 / 2.00 / 2.52; a ring of 2 rows
1.28 / 2.28 at 2/10x against 1.30 / 2.12 (4 x 1 blocks at 3/10x: 0.92 / 0.87 against
0.91 / 0.84). On AVX2 a ring of 8 rows holds one vector, so rings there had 4 rows
already."""

PIECES_MIN_LANES = 16
PIECES_MAX_COLUMNS = 24
"""On vectors of :data:`PIECES_MIN_LANES` lanes or more, SIMD-wide UBP blocks of a conv
whose filters keep fewer than this many weights each (input columns, 9.6 for 1x1
96->576 at 10x) run the gathered kernel as pieces (two FMAs a block) instead of the
ring. With 16 filters a vector, the gathered kernel reads the blocked input and writes
the blocked output as they are, where the ring's output stage turns every pixel vector
of its finished rows into channel vectors: on 1x1 96->576 @14 in 16 x 1 blocks at 10x
(AVX-512, Xeon, 1 thread) the ring took 0.0335 ms with every row's block count 0, 1.5x
the aligned blocks' whole kernel (0.0218), and 0.0483 with its blocks; the pieces
0.0348. Time over aligned 16 x 1 blocks' (10th percentiles of 15 interleaved rounds),
ring of 4 rows / pieces: 96->576 @14 1.36 / 1.57, 1.55 / 1.67, 1.81 / 1.66, 2.22 / 1.68
at 2/3/5/10x (48, 32, 19.2 and 9.6 weights a filter); 320->1280 @7 1.48 / 1.58, 1.48 /
1.71, 1.40 / 1.66, 1.37 / 1.68 (160 down to 32 a filter). The ring on the output
pixels as one row (1x1 convs of stride 1: no row padding, 196 pixels in 13 to 16
vectors rather than 16 rows of 16) took 1.31 at 2x and 1.96 at 10x. MobileNetV2 with
16 x 1 blocks on its 1x1 convs (10x for 96 inputs or fewer, else 3x; 1 thread): 3.7 ms
with 14 of them as pieces, 4.3-4.5 with the ring on all. On AVX2 the ring stays (8 x 1
blocks at 5/10x on 96->576 @14: 1.04 / 1.21)."""


class UnalignedBlockKernel(RowsKernel):
    """Unaligned blocks (UBP). Convs on CPUs run the ring kernel
    (``tir_schedules.sparse_ring``: UBP's own output-stationary kernel, vectorized
    along output pixels, a ring of ``GR`` accumulator rows walking down the filters):
    with pixels as the vector axis every weight is a broadcast, so a block's offset
    wastes no lane, and each block is one tap wherever it starts. Measured (1 thread,
    Zen3, 4 x 1 blocks, against aligned blocks' register tiles at equal rate): 1x1
    96->576 @14 0.93-1.04x their time at 2/3/5/10x, 320->1280 @7 0.94-1.02x; the
    register tiles of :class:`RowsKernel` (a block straddling two tiles stores a tap
    in each, 7393 taps against 4608 blocks at 3x) took 1.3-1.7x. Blocks taller than
    the ring run as two or more of its taps (:data:`RING_MAX_ROWS`,
    :data:`RING_MIN_VECTORS`); on 16-lane vectors, SIMD-wide blocks of filters that keep
    few weights run the gathered kernel as pieces (:data:`PIECES_MAX_COLUMNS`). With filters as
    the vector axis (the gathered kernel, which OpenCL keeps where the output channels
    split into tiles of its vector) a lane cannot move between registers inside an FMA,
    and a block crossing a tile boundary is two pieces, two FMAs per pixel. Measured
    (1 thread, Zen3), register tiles against pieces: 1x1 96->576 @14 in 4 x 1 blocks at
    3x 0.21 against 0.35 ms, at 10x 0.073 against 0.095; 8 x 1 at 5x 0.120 against 0.130;
    24->144 @56 at 2x 0.35 against 0.42. GEMMs on CPUs put
    each block on a phase plane of tiles of about its height, at most the vector
    (``tir_schedules.sparse_unaligned``): aligned in the tiling shifted by its start row,
    one tap, one vector, as an aligned block is (at batch 1 a GEMM is bound by its
    weights' bytes, which the two pieces would double); the tiles run four to a tap
    loop, then the planes are summed at their shifts. FC 1024->1000 in 4 x 1 blocks at
    2/3/5/10x, with one tap loop per tile: 0.088/0.047/0.026/0.014 ms (aligned 4 x 1
    blocks 0.092/0.050/0.027/0.013; pieces in tiles of 4 0.144/-/0.055/0.024; rotated
    0.157/-/0.081/0.032); four tiles a loop, medians of 30 interleaved rounds on a busy
    host: 0.085/0.058/0.031/0.018 (aligned 0.090/0.062/0.035/0.020). In 16 x 1 blocks on
    AVX-512 (16 planes; Xeon, 1 thread, 10th percentiles of 20 interleaved rounds):
    1.02/1.10/1.13/1.21-1.27x aligned blocks' time, where one rotated vector a block
    took 1.43/1.79/1.67/1.65x.
    """

    def __init__(self):
        super().__init__("unaligned_rows", (2, 4, 8))
        # 1 thread, Zen3, speed-up over dense / rate on 1x1 convs (ring, 4 x 1 and 8 x 1):
        # 96->576 @14 0.57 at 3x, 0.48 at 5x, 0.30 at 10x; 320->1280 @7 0.74, 0.68, 0.56
        self.relative_speed = 0.6

    @staticmethod
    def _tile(weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> int | None:
        """The gathered form's tile of output channels, or None for the rows form. On
        CPUs a conv takes it only for SIMD-wide blocks of filters that keep few weights,
        on vectors of :data:`PIECES_MIN_LANES` or more (:data:`PIECES_MAX_COLUMNS`)."""
        lanes = _target_lanes()
        if geometry.op == "matmul":
            return lanes
        if geometry.kind == DEPTHWISE or (geometry.out_channels // geometry.groups) % lanes:
            return None
        if _target_family() in CPU_FAMILIES and not (
                int(spec.block[0]) >= lanes >= PIECES_MIN_LANES and geometry.groups == 1
                and np.count_nonzero(weight) < PIECES_MAX_COLUMNS * geometry.out_channels):
            return None
        return lanes

    def pack(self, weight: np.ndarray, spec: SchemeSpec, geometry: LayerGeometry) -> Packed:
        from tir_schedules.sparse_unaligned import pack_phase_tiles

        pixels = geometry.output_pixels()
        tile = self._tile(weight, spec, geometry)
        if geometry.op == "matmul" and _target_family() in CPU_FAMILIES:
            self.name = "unaligned_phases"
            rows = int(spec.block[0])
            height = min(t for t in (4, 8, tile) if t >= min(rows, tile))
            phased = pack_phase_tiles(weight, height)
            return Packed(phased, int(np.count_nonzero(weight)) * pixels,
                          phased.kept_taps() * height * pixels)
        if tile is None:
            ring_rows = self._ring_rows(geometry, int(spec.block[0]))
            if ring_rows is None:
                self.name = "unaligned_rows"
                return super().pack(weight, spec, geometry)
            from tir_schedules.sparse_ring import pack_ring

            self.name = "unaligned_ring"
            ring = pack_ring(weight.reshape(weight.shape[0], -1), ring_rows)
            return Packed(ring, int(np.count_nonzero(weight)) * pixels,
                          ring.blocks() * ring.rows * pixels)
        self.name = "unaligned_gathered"
        return packed_gathered(weight, tile, geometry, _OtherForm)

    def _ring_tile(self, geometry: LayerGeometry, rows: int):
        """The ring kernel's register tile for the layer on the current CPU, or None
        where it does not apply: OpenCL, grouped convs (a block could span two groups),
        fewer filters than the ring's rows, and tiles of fewer than
        :data:`RING_MIN_VECTORS` pixel vectors."""
        from tir_schedules.sparse_ring import choose_ring_tile

        if (_target_family() not in CPU_FAMILIES or geometry.groups != 1
                or geometry.kind == DEPTHWISE or rows > geometry.out_channels):
            return None
        tile = self._row_tile(geometry, rows, choose_ring_tile)
        return tile if tile is not None and tile.vectors >= RING_MIN_VECTORS else None

    def _ring_rows(self, geometry: LayerGeometry, rows: int) -> int | None:
        """The ring's height for blocks of ``rows``: ``rows`` up to
        :data:`RING_MAX_ROWS`, else the largest half, quarter, ... (at least 2) whose ring
        has a register tile (a block is then two or more taps of the ring), else None
        (:data:`RING_MIN_VECTORS`)."""
        rows = min(rows, RING_MAX_ROWS)
        while rows >= 2:
            if self._ring_tile(geometry, rows) is not None:
                return rows
            rows //= 2
        return None

    def conv2d(self, bb, data, in_block: int, packed: Packed, geometry: LayerGeometry):
        from tir_schedules.sparse_ring import RingBlocks

        if isinstance(packed.arrays, RingBlocks):
            return self._ring_conv2d(bb, data, in_block, packed.arrays, geometry)
        if not isinstance(packed.arrays, _OtherForm):
            return super().conv2d(bb, data, in_block, packed, geometry)
        inner = _OtherForm.unwrapped(packed)
        self._block = inner.arrays.block
        return GATHERED.conv2d(bb, data, in_block, inner, geometry)

    def _ring_conv2d(self, bb, data, in_block: int, ring, geometry: LayerGeometry):
        from tir_schedules.sparse_csr import row_tile_layout
        from tir_schedules.sparse_ring import padded_starts, ring_conv2d, ring_offsets

        tile = self._ring_tile(geometry, ring.rows)
        block = self._output_block_of(geometry)
        n, channels, height, width = geometry.data_shape
        data_shape = (n, channels // in_block, height, width, in_block)
        kernel = tuple(geometry.weight_shape[2:])
        conv = (geometry.strides, geometry.padding, geometry.dilation)
        func = ring_conv2d(data_shape, int(ring.values.shape[0]), ring.rows, *conv,
                           geometry.out_channels, kernel, tile, block)
        grid, (out_h, out_w), _ = row_tile_layout(data_shape, kernel, *conv, tile)
        out_shape = (n, geometry.out_channels // block, out_h, out_w, block)
        return call_primfunc(bb, func, "sparse_ring_conv2d", data,
                             (ring.values, ring_offsets(ring, grid), padded_starts(ring, block)),
                             out_shape)

    def matmul(self, bb, data, packed: Packed, geometry: LayerGeometry):
        from tir_schedules.sparse_unaligned import (PhaseTiles, phase_row_tile,
                                                    phase_tiles_dense)

        if isinstance(packed.arrays, PhaseTiles):
            phased = packed.arrays
            batch = int(np.prod(geometry.data_shape[:-1]))
            row_tile = phase_row_tile(batch, phased.tiles, _target_registers(_target_lanes()))
            func = phase_tiles_dense(batch, phased.in_features, phased.out_features,
                                     phased.values.shape[0], phased.counts.size,
                                     phased.tiles, phased.height, phased.groups, row_tile)
            return call_primfunc(bb, func, "sparse_dense", data,
                                 (phased.values, phased.columns, phased.offsets,
                                  phased.counts, phased.rows),
                                 (batch, geometry.out_channels))
        if isinstance(packed.arrays, _OtherForm):
            packed = _OtherForm.unwrapped(packed)
        return GATHERED.matmul(bb, data, packed, geometry)


register_sparse_kernel("block_based", BlockBasedKernel(), ALL_FAMILIES)
register_sparse_kernel("pattern", PatternKernel(), ALL_FAMILIES)
register_sparse_kernel("unstructured", RowsKernel("csr", (1,)), ALL_FAMILIES)
register_sparse_kernel("unaligned_block", UnalignedBlockKernel(), ALL_FAMILIES)
