"""ghmd.binning against the straightforward reference, mmdetection's loop over the edges
(``e_i <= g < e_(i+1)`` for every i), on the float32 values where a shortcut would go wrong: the
floats a few ulps around every edge, for every bin count up to 64 and a spread of larger ones up
to the server's 4096, both losses' edges. Exact equality, element by element, of the bins and of
the one-bincount histogram the losses send."""

from __future__ import annotations

import pytest
import torch

from ghmd.binning import bin_edges, bin_indices, bin_slots, slot_count, upper_edges

BIN_COUNTS = list(range(1, 65)) + [97, 100, 127, 128, 255, 256, 300, 511, 999, 1000, 1023, 1024,
                                   2047, 2048, 2049, 4095, 4096]
ULPS = 4  # floats on each side of every edge


def near_edges(edges: torch.Tensor) -> torch.Tensor:
    """Every edge and the ULPS float32 values on either side of it."""
    up, down, values = edges.clone(), edges.clone(), [edges]
    for _ in range(ULPS):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        values += [up, down]
    return torch.cat(values)


def loop_over_edges(g: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The reference: the number of edges at or below g, minus one, every g compared with every
    edge (a block of g at a time). With increasing edges that is the i of mmdetection's masks
    e_i <= g < e_(i+1); -1 below the first edge, M at or past the last, M for NaN (which no
    comparison admits)."""
    bins = edges.numel() - 1
    flat = g.reshape(-1)
    block = max(1, 2**24 // edges.numel())
    index = torch.cat([(flat[start:start + block, None] >= edges[None, :]).sum(1) - 1
                       for start in range(0, flat.numel(), block)])
    index[torch.isnan(flat)] = bins
    return index.reshape(g.shape)


@pytest.mark.parametrize("loss", ["ghm_c", "ghm_r"])
def test_every_value_next_to_an_edge_is_binned_as_the_loop_does(loss):
    generator = torch.Generator().manual_seed(0)
    for bins in BIN_COUNTS:
        edges = bin_edges(loss, bins)
        g = torch.cat([near_edges(edges), torch.rand(2000, generator=generator),
                       torch.tensor([0.0, -0.0, 1.0, 1e-30, 1e30, float("inf"), -1e-30,
                                     -float("inf"), float("nan")])])
        expected = loop_over_edges(g, edges)
        got = bin_indices(g, edges)
        assert got.dtype == torch.int32
        wrong = torch.nonzero(got.long() != expected).reshape(-1)
        assert wrong.numel() == 0, (
            f"{loss}, {bins} bins: g = {g[wrong[0]].item()!r} binned {got[wrong[0]].item()}, "
            f"the loop says {expected[wrong[0]].item()} ({wrong.numel()} values wrong)"
        )


@pytest.mark.parametrize("loss", ["ghm_c", "ghm_r"])
def test_the_slots_histogram_equals_the_loops_masks(loss):
    """What the losses send: per-bin counts of the valid elements, one slot past the bins for a
    valid g outside them, and the invalid elements apart, whatever their g."""
    generator = torch.Generator().manual_seed(1)
    for bins in (1, 7, 10, 30, 100, 4096):
        edges = bin_edges(loss, bins)
        g = torch.cat([near_edges(edges), torch.rand(5000, generator=generator)])
        g = g[g >= 0]  # the losses' g is an absolute value
        g = g[torch.randperm(g.numel(), generator=generator)][: g.numel() // 3 * 3].reshape(-1, 3)
        invalid = torch.rand(g.shape, generator=generator) < 0.2
        slots = bin_slots(g, upper_edges(edges), invalid)
        assert slots.dtype == torch.int32 and slots.shape == (g.numel(),)
        tally = torch.bincount(slots, minlength=slot_count(bins))
        assert tally.numel() == slot_count(bins)
        valid = ~invalid
        expected = torch.bincount(loop_over_edges(g, edges)[valid], minlength=bins + 1)
        assert torch.equal(tally[: bins + 1], expected), (loss, bins)
        assert tally[bins + 1:].sum() == invalid.sum()


def test_binning_equals_a_binary_search_of_the_edges():
    generator = torch.Generator().manual_seed(9)
    g = torch.cat([torch.rand(200_000, generator=generator),
                   torch.rand(1000, generator=generator) * 3 - 1,
                   torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), float("nan")])])
    for loss in ("ghm_c", "ghm_r"):
        for bins in (1, 2, 10, 30, 97, 4096):
            edges = bin_edges(loss, bins)
            searched = torch.bucketize(g, edges, right=True) - 1
            searched[searched > bins] = bins  # NaN: past the last edge
            assert torch.equal(bin_indices(g, edges).long(), searched), (loss, bins)


def test_other_float_dtypes_are_binned_as_their_float32_value():
    edges = bin_edges("ghm_c", 30)
    g = torch.rand(10_000, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = g.to(dtype)
        assert torch.equal(bin_indices(low, edges), bin_indices(low.float(), edges)), dtype
