"""Every conformance case (the repository's copy, tests/data/conformance) bit for bit through the
Python client against a real ghmd: unary Harmonize, the streaming session, and the histogram
path with bins computed by ghmd.torch on the tensor's device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import conformance_cases, load_case
from ghmd.torch import bin_edges, bin_indices

CASES = conformance_cases()


def f32(values) -> np.ndarray:
    # Each JSON number is the shortest decimal of a float32, so this is exact.
    return np.array(values, dtype=np.float32)


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == np.float32 and actual.shape == expected.shape, (
        f"{what}: {actual.dtype}{actual.shape} vs {expected.dtype}{expected.shape}"
    )
    differ = np.flatnonzero(actual.view(np.uint32) != expected.view(np.uint32))
    assert differ.size == 0, (
        f"{what}: {differ.size} values differ, first at {differ[0]}: "
        f"{actual[differ[0]]!r} != {expected[differ[0]]!r}"
    )


def create(client, job_id, case):
    return client.create_job(
        job_id, case["loss"], case["bins"], case["momentum"], case.get("mu", 0.0)
    )


def test_the_repository_has_every_kind_of_case():
    names = {path.stem for path in CASES}
    assert len(names) >= 5
    assert any(name.startswith("ghmc") for name in names)
    assert any(name.startswith("ghmr") for name in names)
    assert any("edges" in name for name in names)


@pytest.mark.parametrize("transport", ["unary", "stream"])
@pytest.mark.parametrize("path", CASES, ids=lambda path: path.stem)
def test_case_through_harmonize(client, job_id, path, transport):
    case = load_case(path)
    create(client, job_id, case)
    with client.stream() as session:
        send = client if transport == "unary" else session
        for index, step in enumerate(case["steps"]):
            expected = step["expected"]
            result = send.harmonize(
                job_id,
                f32(step["gradient_norms"]),
                label_weights=f32(step["label_weights"]),
                step=index,
            )
            where = f"{path.stem} step {index}"
            assert_bits_equal(result.weights, f32(expected["weights"]), f"{where} weights")
            assert result.tot == expected["tot"], where
            assert result.nonempty_bins == expected["nonempty_bins"], where
            assert result.step == index
            if case["momentum"] > 0:
                assert_bits_equal(result.acc_sum, f32(expected["acc_sum"]), f"{where} acc_sum")
            else:
                assert result.acc_sum.size == 0, where
    job = client.get_job(job_id)
    assert job.state.steps == len(case["steps"])


@pytest.mark.parametrize("path", CASES, ids=lambda path: path.stem)
def test_case_through_histograms_binned_by_ghmd_torch(client, job_id, path):
    """The histogram path: counts from ghmd.torch's binning, the server's bin table applied
    locally, must give the reference's weights; the edges case puts values one ulp from every
    edge, where floor(g * M) would misplace them."""
    case = load_case(path)
    create(client, job_id, case)
    bins = case["bins"]
    edges = bin_edges(case["loss"], bins)
    for index, step in enumerate(case["steps"]):
        g = torch.from_numpy(f32(step["gradient_norms"]))
        label_weights = torch.from_numpy(f32(step["label_weights"]))
        valid = label_weights > 0
        bin_of = bin_indices(g, edges)
        assert bool(((bin_of >= 0) & (bin_of < bins))[valid].all())
        counts = torch.bincount(bin_of[valid], minlength=bins).numpy()
        if case["loss"] == "ghm_c":
            tot = float(valid.sum())
        else:
            tot = float(label_weights.sum().double())
        result = client.harmonize_histogram(job_id, counts, tot, step=index)
        assert result.weights.size == 0
        table = torch.from_numpy(result.bin_weights)
        weights = torch.where(valid, table[bin_of.clamp(0, bins - 1)], torch.zeros(()))
        where = f"{path.stem} step {index}"
        assert_bits_equal(weights.numpy(), f32(step["expected"]["weights"]), f"{where} weights")
        assert result.tot == step["expected"]["tot"], where
        assert result.nonempty_bins == step["expected"]["nonempty_bins"], where
        if case["momentum"] > 0:
            assert_bits_equal(
                result.acc_sum, f32(step["expected"]["acc_sum"]), f"{where} acc_sum"
            )
