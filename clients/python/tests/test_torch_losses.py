"""ghmd.torch.GHMC / GHMR against the in-test port of mmdetection's loops: the same loss and the
same gradients, bit for bit, over several steps with momentum > 0, in histogram and raw modes."""

from __future__ import annotations

import pytest
import torch

from ghmd import GhmdError
from ghmd.torch import GHMC, GHMR, bin_edges, expand_onehot_labels
from mmdet_port import PortGHMC, PortGHMR, onehot

MODES = ["histogram", "raw"]


def batches_c(seed, steps, n=300, classes=6):
    """Detector-like classification batches: mostly easy negatives, a few positives, some
    ignored entries, a few logits large enough that sigmoid saturates (g exactly 0 or 1)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pred = torch.randn(n, classes, generator=generator) * 4 - 2
        pred[:5] = torch.tensor([40.0, -40.0, 0.0, 17.0, -17.0]).reshape(5, 1)
        target = (torch.rand(n, classes, generator=generator) < 0.05).float()
        label_weight = (torch.rand(n, classes, generator=generator) > 0.1).float()
        yield pred, target, label_weight


def batches_r(seed, steps, n=200):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pred = torch.randn(n, 4, generator=generator) * 0.3
        target = torch.randn(n, 4, generator=generator) * 0.3
        target[:3] = pred[:3]  # d = 0: g = 0
        label_weight = (torch.rand(n, 4, generator=generator) > 0.4).float()
        yield pred, target, label_weight


def assert_same(reference, ours, what):
    assert reference.dtype == ours.dtype and reference.shape == ours.shape, what
    assert torch.equal(reference, ours), (
        f"{what}: max difference {(reference - ours).abs().max().item()}"
    )


def run_both(reference, ours, batches, **forward_kwargs):
    for step, (pred, target, label_weight) in enumerate(batches):
        pred_ref = pred.clone().requires_grad_()
        pred_ours = pred.clone().requires_grad_()
        loss_ref = reference(pred_ref, target, label_weight, **forward_kwargs)
        loss_ours = ours(pred_ours, target, label_weight, **forward_kwargs)
        assert_same(loss_ref, loss_ours, f"loss at step {step}")
        loss_ref.sum().backward()
        loss_ours.sum().backward()
        assert_same(pred_ref.grad, pred_ours.grad, f"gradient at step {step}")
        if reference.momentum > 0:
            assert_same(reference.acc_sum, ours.acc_sum, f"acc_sum at step {step}")
    return step + 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bins,momentum", [(30, 0.75), (10, 0.0), (7, 0.3)])
def test_ghmc_equals_mmdetection(address, job_id, mode, bins, momentum):
    reference = PortGHMC(bins=bins, momentum=momentum, loss_weight=1.5)
    ours = GHMC(bins=bins, momentum=momentum, loss_weight=1.5, job_id=job_id, address=address,
                mode=mode)
    steps = run_both(reference, ours, batches_c(seed=bins, steps=6))
    assert ours.last_result.step == steps - 1
    ours.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bins,momentum,mu", [(10, 0.7, 0.02), (10, 0.0, 0.02), (5, 0.9, 0.1)])
def test_ghmr_equals_mmdetection(address, job_id, mode, bins, momentum, mu):
    reference = PortGHMR(mu=mu, bins=bins, momentum=momentum, loss_weight=10.0)
    ours = GHMR(mu=mu, bins=bins, momentum=momentum, loss_weight=10.0, job_id=job_id,
                address=address, mode=mode)
    run_both(reference, ours, batches_r(seed=bins, steps=6))
    ours.close()


@pytest.mark.parametrize("mode", MODES)
def test_integer_labels_are_expanded_as_mmdetection_does(address, job_id, mode):
    classes = 5
    generator = torch.Generator().manual_seed(7)
    # Labels in [0, C) are classes, C is background, -1 is outside both: zero rows.
    labels = torch.randint(-1, classes + 1, (120,), generator=generator)
    label_weight = (torch.rand(120, generator=generator) > 0.2).float()
    expanded, weights = expand_onehot_labels(labels, label_weight, classes)
    port_expanded, port_weights = onehot(labels, label_weight, classes)
    assert torch.equal(expanded, port_expanded) and torch.equal(weights, port_weights)
    assert expanded[labels == classes].sum() == 0 and expanded[labels == -1].sum() == 0

    reference = PortGHMC(bins=10, momentum=0.75)
    ours = GHMC(bins=10, momentum=0.75, job_id=job_id, address=address, mode=mode)
    batches = [
        (torch.randn(120, classes, generator=generator) * 3, labels, label_weight)
        for _ in range(3)
    ]
    run_both(reference, ours, batches)
    ours.close()


def test_reduction_override(address, job_id):
    reference = PortGHMC(bins=10, momentum=0.75)
    ours = GHMC(bins=10, momentum=0.75, job_id=job_id, address=address)
    run_both(reference, ours, batches_c(seed=3, steps=2), reduction_override="none")
    pred, target, label_weight = next(batches_c(seed=4, steps=1))
    with pytest.raises(ValueError, match="sum"):
        ours(pred, target, label_weight, reduction_override="sum")
    with pytest.raises(ValueError, match="reduction_override"):
        ours(pred, target, label_weight, reduction_override="max")
    ours.close()


def test_histogram_mode_sends_only_the_histogram(address, job_id):
    ours = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address, stream=False)
    sent = []
    client = ours._connection()
    original = client.harmonize_histogram

    def spy(job, counts, tot, step=None, rank=0):
        sent.append((counts.copy(), tot, step))
        return original(job, counts, tot, step=step, rank=rank)

    client.harmonize_histogram = spy
    client.harmonize = None  # the raw path must not be taken
    for pred, target, label_weight in batches_c(seed=5, steps=3, n=4000):
        ours(pred, target, label_weight)
        counts, tot, _ = sent[-1]
        assert counts.shape == (30,) and counts.sum() == tot == (label_weight > 0).sum()
    assert [step for _, _, step in sent] == [0, 1, 2]
    job = client.get_job(job_id)
    assert job.state.steps == 3 and job.state.elements == sum(int(t) for _, t, _ in sent)
    ours.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_non_finite_prediction_is_refused_before_it_reaches_the_job(address, job_id, mode):
    ours = GHMR(bins=10, momentum=0.7, job_id=job_id, address=address, mode=mode)
    pred = torch.zeros(10, 4)
    pred[3, 2] = float("inf")
    with pytest.raises(ValueError, match="element 14"):
        ours(pred, torch.zeros(10, 4), torch.ones(10, 4))
    pred[3, 2] = float("nan")
    weights = torch.ones(10, 4)
    weights[3, 2] = 0  # an ignored element may be anything, as in mmdetection
    ours(pred, torch.zeros(10, 4), weights)
    assert ours._connection().get_job(job_id).state.steps == 1
    ours.close()


def test_constructor_matches_mmdetection(address, job_id):
    with pytest.raises(NotImplementedError):
        GHMC(use_sigmoid=False, job_id=job_id)
    with pytest.raises(ValueError, match="mode"):
        GHMC(job_id=job_id, mode="fast")
    with pytest.raises(TypeError, match="job_id"):
        GHMC(30, 0.75)  # the job id is required, and keyword-only after mmdetection's arguments
    with pytest.raises(ValueError, match="job_id"):
        GHMC(job_id="")
    with pytest.raises(TypeError, match="bnis=30") as error:
        GHMC(job_id=job_id, bnis=30)  # a typo is named, not ignored
    assert "_delete_" not in str(error.value)
    with pytest.raises(TypeError, match="_delete_=True"):
        GHMC(job_id=job_id, gamma=2.0, alpha=0.25)  # FocalLoss's keys, merged by mmengine
    loss = GHMR(0.05, 12, 0.6, 2.0, job_id=job_id, address=address)
    assert (loss.mu, loss.bins, loss.momentum, loss.loss_weight) == (0.05, 12, 0.6, 2.0)
    assert set(dict(loss.named_buffers())) == {"edges", "acc_sum"}
    assert torch.equal(loss.edges, PortGHMR(0.05, 12, 0.6).edges)
    assert torch.equal(GHMC(bins=12, job_id=job_id).edges, PortGHMC(bins=12).edges)


def test_a_job_with_another_spec_is_an_error(address, job_id):
    GHMC(bins=10, job_id=job_id, address=address)(*next(batches_c(seed=1, steps=1)))
    clash = GHMC(bins=20, job_id=job_id, address=address)
    with pytest.raises(GhmdError) as error:
        clash(*next(batches_c(seed=1, steps=1)))
    assert error.value.code.name == "ALREADY_EXISTS"


HALF_DTYPES = [torch.float16, torch.bfloat16]


def sparse_bin_batch(dtype, n=100_000, classes=10):
    """A large batch of easy negatives (g about 0, bin 0) and one element alone in a middle
    bin: its weight tot / acc_sum / n is far above float16's 65504."""
    pred = torch.full((n // classes, classes), -20.0)
    pred[7, 3] = 0.0  # g = 0.5
    target = torch.zeros_like(pred)
    return pred.to(dtype), target.to(dtype), torch.ones_like(pred)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_inputs_are_weighed_and_applied_in_float32(address, job_id, dtype, mode):
    """mmdetection's GHMC builds its weights with zeros_like(pred): in float16 tot / acc_sum
    overflows to inf for a sparse bin of a large batch. ghmd's losses compute g, the weights and
    the loss in float32 whatever the input dtype: the same bits as the float32 reference on the
    upcast inputs, and a gradient that is that reference's, cast to the input's dtype."""
    reference = PortGHMC(bins=30, momentum=0.75)
    ours = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address, mode=mode)
    for step in range(2):
        pred, target, label_weight = sparse_bin_batch(dtype)
        pred_ours = pred.clone().requires_grad_()
        pred_ref = pred.float().requires_grad_()
        loss = ours(pred_ours, target, label_weight)
        expected = reference(pred_ref, target.float(), label_weight)
        assert ours.last_result.bin_weights.max() > 65504, "the case must overflow float16"
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert_same(expected, loss, f"{dtype} loss at step {step}")
        loss.backward()
        expected.backward()
        assert pred_ours.grad.dtype == dtype and torch.isfinite(pred_ours.grad).all()
        assert_same(pred_ref.grad.to(dtype), pred_ours.grad, f"{dtype} gradient at step {step}")
    ours.close()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_regression_inputs(address, job_id, dtype):
    reference = PortGHMR(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0)
    ours = GHMR(mu=0.02, bins=10, momentum=0.7, loss_weight=10.0, job_id=job_id, address=address)
    for pred, target, label_weight in batches_r(seed=4, steps=3, n=20_000):
        pred, target = pred.to(dtype), target.to(dtype)
        loss = ours(pred, target, label_weight)
        expected = reference(pred.float(), target.float(), label_weight)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert_same(expected, loss, f"{dtype} GHM-R loss")
    ours.close()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_under_autocast_the_loss_is_float32(address, job_id, device):
    """A head under autocast gives bfloat16 (CPU) or float16 (CUDA) logits; the loss, still
    inside autocast, is the float32 reference's on those logits upcast."""
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 10).to(device)
    features = torch.randn(20_000, 16, device=device) * 4
    reference = PortGHMC(bins=30, momentum=0.75).to(device)
    ours = GHMC(bins=30, momentum=0.75, job_id=job_id, address=address).to(device)
    target = (torch.rand(20_000, 10, device=device) < 0.02).float()
    label_weight = torch.ones_like(target)
    with torch.autocast(device_type=device, dtype=dtype):
        logits = head(features)
        assert logits.dtype == dtype
        loss = ours(logits, target, label_weight)
    expected = reference(logits.detach().float(), target, label_weight)
    assert loss.dtype == torch.float32
    assert_same(expected, loss.detach(), f"autocast {device}")
    ours.close()
