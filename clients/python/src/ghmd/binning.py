"""GHM binning on the tensor's own device: the server's float32 edges, and each element's bin.

The losses bin every element of a batch once per step, so this is the hot path of
``ghmd.torch``: a handful of elementwise passes over int32 and float32 (no binary search, no
float64, no ``where`` over the batch), one ``bincount``, and the bits of a loop that compares
every element with every edge, as mmdetection's GHM losses do.

Why one comparison per element is enough. The edges are e_i = float32(i) / float32(M), correctly
rounded (GHM-C then moves the last one past 1, GHM-R to 1000). For a float32 g >= 0 and the
exact product P = g * M, the bin is floor(P), or floor(P) + 1 when g is exactly an edge that was
rounded down below its i / M: no other float32 lies between an edge and the fraction it rounds.
``_guess_scale`` is M shrunk by 2^-20 (in float32), so the float32 product g * scale is always
below P yet above P - 1 for every P below 2^18: its integer part is the bin or one less, never
more, and a single ``g >= e_(guess + 1)`` decides. (Both at once, one less from the shrink and one
more from a rounded-down edge, would need P above 2^18.) Values at or past the last edge land
one past the last bin, and the guess is clamped to M - 1 first so that any size of g is safe.
``tests/test_binning.py`` checks it against the comparison loop on the floats around every edge.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

__all__ = ["bin_edges", "bin_indices", "bin_slots", "slot_count", "upper_edges"]

# Well above the float32 rounding of g * M (2^-24) and well below the room a bin leaves (1 / M).
_SHRINK = 2.0**-20


def bin_edges(loss: str, bins: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """The M+1 float32 bin edges, exactly as the server and mmdetection compute them.

    e_i = float32(i) / float32(M); GHM-C then adds 1e-6 to the last edge (so g = 1 falls in the
    last bin), GHM-R sets it to 1000.
    """
    edges = torch.arange(bins + 1, dtype=torch.float32, device=device) / bins
    if loss == "ghm_c":
        edges[-1] += 1e-6
    else:
        edges[-1] = 1000.0
    return edges


def upper_edges(edges: torch.Tensor) -> torch.Tensor:
    """e_1 .. e_M (a view): entry i closes bin i, the one comparison ``bin_slots`` makes."""
    return edges[1:]


def _guess_scale(bins: int) -> float:
    return float(np.float32(bins) * np.float32(1.0 - _SHRINK))


def slot_count(bins: int) -> int:
    """How many slots ``bin_slots`` uses: M bins and 'past the last edge', then both again for
    the elements that are not valid."""
    return 2 * (bins + 1)


def bin_slots(g: torch.Tensor, upper: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """The slot of each element of g (float32, >= 0 or NaN), as a flat int32 tensor.

    Slot i < M: a valid element in bin i; M: a valid element at or past the last edge; M + 1 + s:
    an element that ``invalid`` marks, which would otherwise be in slot s. One ``bincount`` with
    ``slot_count(M)`` slots then gives the histogram, and a table of that length indexed by the
    slots gives every element's weight, 0 for the invalid ones, without a ``where``.

    A NaN lands in an unspecified bin: callers check for NaN separately (a sum is NaN exactly
    when an element is), as they must for valid elements anyway.
    """
    bins = upper.numel()
    flat = g.reshape(-1)
    guess = torch.mul(flat, _guess_scale(bins))
    guess.clamp_(max=bins - 1)
    slots = guess.to(torch.int32)
    slots.clamp_(min=0)  # NaN converts to an arbitrary integer
    closing = torch.index_select(upper, 0, slots, out=guess)  # reuses the guess's memory
    slots.add_(flat >= closing)
    slots.add_(invalid.reshape(-1), alpha=bins + 1)
    return slots


def bin_indices(g: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin of each g (any shape, any float dtype): i with e_i <= g < e_(i+1), as int32.

    Values below the first edge give -1; values at or past the last edge, and NaN, give M. The
    same answer as ``torch.bucketize(g, edges, right=True) - 1`` with NaN mapped to M, and as
    comparing every g with every edge; the losses use ``bin_slots``, its fast part.
    """
    g = g.float()
    bins = edges.numel() - 1
    nonnegative = g.clamp(min=0.0)  # NaN stays NaN
    index = bin_slots(nonnegative, upper_edges(edges), torch.zeros_like(g, dtype=torch.bool))
    index = index.reshape(g.shape)
    index = torch.where(torch.isnan(g), bins, index)
    return torch.where(g < edges[0], -1, index).to(torch.int32)
