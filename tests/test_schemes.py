"""Property tests of the pruning schemes: masks follow their own structure, hit the rate
(within 2% or the nearest the structure attains), keep the largest-magnitude structure,
and BED selects almost as well as the exact selector and better than aligned blocks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from npas_tvm.schemes import (
    CONV, CONV1X1, DEPTHWISE, FC, GROUPED, SCHEMES, BlockBasedSpec, BlockPunchedSpec,
    DenseSpec, FilterSpec, PatternSpec, SpecError, UnalignedBlockSpec, UnstructuredSpec,
    detect_spec, get_scheme, make_mask, rate_status, satisfies, spec_from_json)
from npas_tvm.schemes._core import blocked
from npas_tvm.schemes.block_punched import position_scores
from npas_tvm.schemes.pattern import CANDIDATES, kernels, pattern_set
from npas_tvm.schemes.unaligned_block import (
    aligned_blocks, bed_blocks, blocks_score, exact_blocks, window_scores)

SEARCH_RATES = [1.0, 2.0, 2.5, 3.0, 5.0, 7.0, 10.0]
rates = st.one_of(st.sampled_from(SEARCH_RATES), st.floats(1.0, 12.0))
PROPERTY = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def random_weight(seed: int, shape: tuple[int, ...], style: str) -> np.ndarray:
    """Weights of a few kinds: gaussian, heavy-tailed, and coarse (many ties)."""
    rng = np.random.default_rng(seed)
    if style == "laplace":
        return rng.laplace(size=shape).astype(np.float32)
    if style == "ties":
        return np.round(rng.standard_normal(shape)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


@st.composite
def shapes_for(draw, kind: str, kernel: int | None = None) -> tuple[int, ...]:
    out = draw(st.integers(1, 40))
    if kind == FC:
        return (out, draw(st.integers(1, 40)))
    if kind == CONV1X1:
        return (out, draw(st.integers(1, 40)), 1, 1)
    size = kernel or draw(st.sampled_from([3, 5]))
    channels = 1 if kind == DEPTHWISE else draw(st.integers(1, 16))
    return (out, channels, size, size)


@st.composite
def block_within(draw, rows: int, cols: int) -> tuple[int, int]:
    return (draw(st.integers(1, min(rows, 16))), draw(st.integers(1, min(cols, 8))))


@st.composite
def layer_cases(draw, scheme_names=tuple(SCHEMES)):
    """(weight, kind, spec) for a random registered scheme on a layer it fits."""
    name = draw(st.sampled_from(scheme_names))
    scheme = get_scheme(name)
    kind = draw(st.sampled_from(scheme.kinds))
    shape = draw(shapes_for(kind, 3 if name == "pattern" else None))
    rate = 1.0 if name == "dense" else draw(rates)
    fields: dict = {"rate": rate}
    if name == "pattern":
        fields["patterns"] = draw(st.integers(1, 56))
    elif name in ("block_punched", "block_based"):
        fields["block"] = draw(block_within(shape[0], shape[1]))
        if name == "block_based":
            fields["rows"] = draw(st.booleans())
    elif name == "unaligned_block":
        fields["block"] = (draw(st.integers(1, min(shape[0], 8))), 1)
    spec = scheme.spec_type(**fields)
    assume(scheme.fit_error(kind, shape, spec) is None)
    style = draw(st.sampled_from(["normal", "laplace", "ties"]))
    return random_weight(draw(st.integers(0, 2**31)), shape, style), kind, spec


# ----------------------------------------------------------------- every scheme


@PROPERTY
@given(layer_cases())
def test_mask_satisfies_its_checker_and_hits_the_rate(case):
    weight, _, spec = case
    mask = make_mask(weight, spec)
    assert mask.shape == weight.shape and mask.dtype == bool
    assert np.array_equal(mask, make_mask(weight, spec)), "masks are deterministic"
    assert satisfies(mask, spec)
    assert satisfies(np.where(mask, weight, 0), spec)
    granularity = get_scheme(spec.scheme).granularity(weight.shape, spec)
    assert rate_status(mask.size, int(mask.sum()), spec.rate, granularity) in ("exact",
                                                                               "nearest")


@PROPERTY
@given(layer_cases())
def test_spec_json_round_trip(case):
    _, _, spec = case
    assert spec_from_json(spec.to_json()) == spec


@settings(max_examples=60, deadline=None)
@given(layer_cases(("filter", "block_punched", "block_based", "pattern", "unaligned_block")))
def test_detect_finds_a_spec_the_mask_satisfies(case):
    weight, kind, spec = case
    pruned = np.where(make_mask(weight, spec), weight, 0)
    found = detect_spec(pruned, kind)
    assert satisfies(pruned, found)
    assert get_scheme(found.scheme).strength >= get_scheme("unstructured").strength or \
        found.scheme == "dense"


# ----------------------------------------------------------------- monotonicity


def assert_kept_outscore_removed(scores: np.ndarray, keep: np.ndarray) -> None:
    if keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max() - 1e-6


@PROPERTY
@given(layer_cases(("unstructured",)))
def test_unstructured_keeps_the_largest_weights(case):
    weight, _, spec = case
    assert_kept_outscore_removed(np.abs(weight), make_mask(weight, spec))


@PROPERTY
@given(layer_cases(("filter",)))
def test_filter_keeps_the_strongest_filters(case):
    weight, _, spec = case
    mask = make_mask(weight, spec).reshape(weight.shape[0], -1)
    assert (mask.all(axis=1) | ~mask.any(axis=1)).all(), "whole filters only"
    norms = np.linalg.norm(weight.reshape(weight.shape[0], -1).astype(np.float64), axis=1)
    assert_kept_outscore_removed(norms, mask.all(axis=1))


@PROPERTY
@given(layer_cases(("block_punched",)))
def test_block_punched_keeps_the_strongest_block_positions(case):
    weight, _, spec = case
    mask = make_mask(weight, spec)
    conv = mask.reshape(mask.shape[0], mask.shape[1], -1)
    bf, bc = spec.block
    units = blocked(conv.reshape(conv.shape[0], -1), bf, bc * conv.shape[2])
    units = units.reshape(units.shape[0], bf, units.shape[2], bc, conv.shape[2])
    kept = units.any(axis=(1, 3))
    real = np.ones(conv.shape, dtype=bool)
    covered = blocked(real.reshape(conv.shape[0], -1), bf, bc * conv.shape[2]).reshape(
        units.shape)
    assert ((units == kept[:, None, :, None, :]) | ~covered).all(), "punched through blocks"
    assert_kept_outscore_removed(position_scores(weight, spec.block), kept)


@PROPERTY
@given(layer_cases(("block_based",)))
def test_block_based_keeps_the_strongest_columns_of_each_block(case):
    weight, _, spec = case
    assume(not spec.rows)
    matrix = weight.reshape(weight.shape[0], weight.shape[1]).astype(np.float64)
    mask = make_mask(weight, spec).reshape(matrix.shape)
    blocks_mask = blocked(mask, *spec.block)
    columns = blocks_mask.any(axis=1)
    real = blocked(np.ones(matrix.shape, dtype=bool), *spec.block)
    assert ((blocks_mask == columns[:, None]) | ~real).all(), "rows of a block share columns"
    scores = np.sqrt(blocked(matrix ** 2, *spec.block).sum(axis=1))
    valid = real.any(axis=1)
    kept_min = np.where(columns & valid, scores, np.inf).min(axis=2)
    removed_max = np.where(~columns & valid, scores, -np.inf).max(axis=2)
    assert (kept_min >= removed_max - 1e-6).all()


@PROPERTY
@given(layer_cases(("pattern",)))
def test_pattern_kernels_take_their_best_pattern_and_strongest_kernels_stay(case):
    weight, _, spec = case
    rows = kernels(make_mask(weight, spec))
    energy = kernels(weight.astype(np.float64)) ** 2
    chosen = CANDIDATES[pattern_set(weight, spec.patterns)]
    best = (energy @ chosen.T.astype(np.float64)).max(axis=1)
    kept = rows.any(axis=1)
    assert (rows[kept].sum(axis=1) == 4).all() and rows[kept, 4].all(), "4 entries, centre"
    used = {tuple(r) for r in rows[kept]}
    assert used <= {tuple(c) for c in chosen} and len(used) <= spec.patterns
    kept_energy = (energy * rows).sum(axis=1)
    assert np.allclose(kept_energy[kept], best[kept]), "each kernel takes its best pattern"
    assert_kept_outscore_removed(best, kept)


# ----------------------------------------------------------------- unaligned blocks


@st.composite
def small_gemm(draw):
    rows, cols = draw(st.integers(4, 40)), draw(st.integers(1, 12))
    size = draw(st.sampled_from([2, 3, 4, 8]))
    assume(size <= rows)
    spec = UnalignedBlockSpec(rate=draw(rates), block=(size, 1))
    style = draw(st.sampled_from(["normal", "laplace"]))
    return random_weight(draw(st.integers(0, 2**31)), (rows, cols), style), spec


@settings(max_examples=80, deadline=None)
@given(small_gemm())
def test_bed_is_near_the_exact_selector_and_above_aligned_blocks(case):
    weight, spec = case
    bed, exact, aligned = (selector(weight, spec) for selector in
                           (bed_blocks, exact_blocks, aligned_blocks))
    assert bed.sum() == exact.sum() == aligned.sum()
    bed_score, exact_score = blocks_score(weight, bed), blocks_score(weight, exact)
    assert bed_score <= exact_score + 1e-6
    assert bed_score >= 0.95 * exact_score
    assert bed_score >= blocks_score(weight, aligned) - 1e-6
    for mask in (bed, exact, aligned):
        assert satisfies(mask, spec)


def brute_force_best(weight: np.ndarray, size: int, count: int) -> float:
    windows = window_scores(np.square(weight.astype(np.float64)).T, size)
    options = [(col, start) for col in range(windows.shape[0])
               for start in range(windows.shape[1])]
    best = -np.inf
    for combo in itertools.combinations(options, count):
        spans = sorted(combo)
        if all(a[0] != b[0] or b[1] >= a[1] + size for a, b in zip(spans, spans[1:])):
            best = max(best, sum(windows[c, s] for c, s in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exact_selector_is_optimal_on_tiny_layers(seed):
    weight = random_weight(seed, (7, 2), "laplace")
    spec = UnalignedBlockSpec(rate=2.0, block=(2, 1))
    mask = exact_blocks(weight, spec)
    assert np.isclose(blocks_score(weight, mask), brute_force_best(weight, 2, mask.sum() // 2))


# ----------------------------------------------------------------- fixed cases


def test_pattern_below_its_floor_gives_the_nearest_attainable_rate():
    weight = random_weight(0, (16, 8, 3, 3), "normal")
    spec = PatternSpec(rate=2.0)
    mask = make_mask(weight, spec)
    assert mask.size / mask.sum() == pytest.approx(2.25)
    granularity = get_scheme("pattern").granularity(weight.shape, spec)
    assert rate_status(mask.size, int(mask.sum()), 2.0, granularity) == "nearest"


def test_ragged_blocks_are_pruned_not_refused():
    weight = random_weight(1, (13, 6, 3, 3), "normal")
    spec = BlockPunchedSpec(rate=3.0, block=(8, 4))
    assert satisfies(make_mask(weight, spec), spec)
    gemm = random_weight(2, (30, 10), "normal")
    spec = BlockBasedSpec(rate=3.0, block=(16, 4))
    assert satisfies(make_mask(gemm, spec), spec)


@pytest.mark.parametrize("spec, kind, shape", [
    (FilterSpec(rate=4.0), CONV, (32, 16, 3, 3)),
    (PatternSpec(rate=3.0), CONV, (32, 16, 3, 3)),
    (BlockPunchedSpec(rate=5.0, block=(8, 4)), CONV, (32, 16, 3, 3)),
    (BlockBasedSpec(rate=3.0, block=(8, 4)), FC, (64, 48)),
    (UnalignedBlockSpec(rate=3.0, block=(4, 1)), CONV1X1, (64, 48, 1, 1)),
    (UnstructuredSpec(rate=3.0), GROUPED, (32, 4, 3, 3)),
    (DenseSpec(), DEPTHWISE, (32, 1, 3, 3)),
])
def test_detect_names_the_scheme_that_pruned(spec, kind, shape):
    weight = random_weight(3, shape, "normal")
    found = detect_spec(np.where(make_mask(weight, spec), weight, 0), kind)
    assert found.scheme == spec.scheme
    assert found.rate == pytest.approx(spec.rate, rel=0.03)
    if hasattr(spec, "block") and spec.scheme != "block_based":
        assert found.block == spec.block


def test_checkers_refuse_other_structures():
    weight = random_weight(4, (16, 8, 3, 3), "normal")
    unstructured = make_mask(weight, UnstructuredSpec(rate=3.0))
    assert not satisfies(unstructured, PatternSpec(rate=3.0))
    assert not satisfies(unstructured, BlockPunchedSpec(rate=3.0, block=(4, 4)))
    assert not satisfies(unstructured, FilterSpec(rate=3.0))
    assert not satisfies(np.ones(weight.shape, dtype=bool), UnstructuredSpec(rate=2.0))
    gemm = random_weight(5, (32, 16), "normal")
    unaligned = make_mask(gemm, UnalignedBlockSpec(rate=3.0, block=(4, 1)))
    assert not satisfies(unaligned, BlockBasedSpec(rate=3.0, block=(8, 4)))
    assert not satisfies(make_mask(gemm, UnstructuredSpec(rate=3.0)),
                         UnalignedBlockSpec(rate=3.0, block=(4, 1)))


@pytest.mark.parametrize("entry, field", [
    ({"scheme": "unstructured", "rate": 0.5}, "rate"),
    ({"scheme": "unstructured", "rate": "3"}, "rate"),
    ({"scheme": "unstructured", "rate": True}, "rate"),
    ({"scheme": "unstructured"}, "rate"),
    ({"scheme": "dense", "rate": 2}, "rate"),
    ({"scheme": "block_punched", "rate": 3, "block": [8]}, "block"),
    ({"scheme": "block_punched", "rate": 3, "block": [0, 4]}, "block"),
    ({"scheme": "block_based", "rate": 3, "rows": "yes"}, "rows"),
    ({"scheme": "pattern", "rate": 3, "patterns": 57}, "patterns"),
    ({"scheme": "unaligned_block", "rate": 3, "block": [4, 2]}, "block"),
    ({"scheme": "pattern", "rate": 3, "blok": [8, 4]}, "blok"),
    ({"scheme": "sparse", "rate": 3}, "scheme"),
    ({"rate": 3}, "scheme"),
])
def test_bad_spec_fields_name_the_field(entry, field):
    with pytest.raises(SpecError) as info:
        spec_from_json(entry)
    assert info.value.field == field and "\n" not in str(info.value)


def test_fit_errors_explain():
    assert "3x3" in get_scheme("pattern").fit_error(CONV, (8, 8, 5, 5), PatternSpec(rate=3))
    assert "1x1 conv" in get_scheme("pattern").fit_error(CONV1X1, (8, 8, 1, 1),
                                                         PatternSpec(rate=3))
    assert "larger than the weight" in get_scheme("block_based").fit_error(
        FC, (8, 8), BlockBasedSpec(rate=3, block=(16, 4)))
    assert get_scheme("block_punched").fit_error(CONV, (13, 6, 3, 3),
                                                 BlockPunchedSpec(rate=3)) is None


def test_ragged_block_below_one_unit_keeps_the_best_block():
    """Rate 2.5 of six 1x1 filters in blocks of five: the mask must keep one block, the
    best-scored one (the block of five), and its own checker must accept that."""
    from npas_tvm.schemes.block_punched import BlockPunchedSpec

    weight = np.array([0.126, -0.132, 0.640, 0.105, -0.536, 0.362],
                      dtype=np.float32).reshape(6, 1, 1, 1)
    spec = BlockPunchedSpec(rate=2.5, block=(5, 1))
    mask = make_mask(weight, spec)
    assert mask.ravel().tolist() == [True] * 5 + [False]
    assert satisfies(mask, spec)
