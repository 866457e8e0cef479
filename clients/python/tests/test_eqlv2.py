"""EQLv2 on ghmd with one process, against a real server: every step of the conformance vectors
(tests/data/conformance/eqlv2_*.json) through Client and through ghmd.torch.EQLV2Loss, bit for
bit; losses and gradients bit for bit against mmdetection 3.3's own EQLV2Loss; the step's round
trip overlapping the next forward; checkpoints both ways; the registry; what a user can get
wrong."""

from __future__ import annotations

import copy
import threading

import grpc
import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, load_case
import mmdet_support  # noqa: F401  (real mmdetection, without mmcv's compiled ops)
from mmdet.models.losses.eqlv2_loss import EQLV2Loss as MmdetEQLV2Loss
from mmdet.registry import MODELS
from mmdet_support import CONFIGS
from mmengine.config import Config
from test_conformance import assert_bits_equal, f32
from test_seesaw import readme_config_blocks

import ghmd.mmdet  # noqa: F401  (registers the Remote* names, as custom_imports does)
from ghmd import Client, GhmdError
from ghmd.torch import EQLV2Loss

CASES = sorted(CONFORMANCE.glob("eqlv2_*.json"))
BUFFERS = ("pos_grad", "neg_grad", "pos_neg")


def create(client, job_id, case, **options):
    return client.create_job(job_id, eqlv2=dict(num_classes=case["num_classes"],
                                                gamma=case["gamma"], mu=case["mu"],
                                                alpha=case["alpha"]), **options)


def test_the_repository_has_an_eqlv2_case():
    assert "eqlv2_c20_sequence" in {path.stem for path in CASES}


@pytest.mark.parametrize("transport", ["unary", "stream"])
@pytest.mark.parametrize("path", CASES, ids=lambda path: path.stem)
def test_case_through_harmonize(client, job_id, path, transport):
    case = load_case(path)
    job = create(client, job_id, case)
    assert (job.spec.eqlv2.num_classes, job.spec.eqlv2.gamma, job.spec.eqlv2.mu,
            job.spec.eqlv2.alpha) == (case["num_classes"], case["gamma"], case["mu"],
                                      case["alpha"])
    # The weights of a step come from pos_neg before it: 100s at creation, then the last answer.
    before = np.array(job.state.eqlv2.pos_neg, dtype=np.float32)
    with client.stream() as session:
        send = client if transport == "unary" else session
        for index, step in enumerate(case["steps"]):
            expected = step["expected"]
            where = f"{path.stem} step {index}"
            assert_bits_equal(before, f32(expected["pos_neg_before"]), f"{where} pos_neg_before")
            result = send.harmonize_eqlv2(job_id, f32(expected["pos_grad_contribution"]),
                                          f32(expected["neg_grad_contribution"]), step=index)
            assert result.method == "eqlv2" and result.steps == index + 1
            for name in BUFFERS:
                assert_bits_equal(result.method_state[name], f32(expected[name]),
                                  f"{where} {name}")
            before = result.method_state["pos_neg"]
    state = client.get_job(job_id).state
    assert state.steps == len(case["steps"]) and state.elements == 0
    for name in BUFFERS:
        assert_bits_equal(np.array(getattr(state.eqlv2, name), dtype=np.float32),
                          f32(case["steps"][-1]["expected"][name]), f"GetJob {name}")


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "waiting"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_the_vectors_losses_through_eqlv2_loss(address, job_id, stream, overlap):
    case = load_case(CONFORMANCE / "eqlv2_c20_sequence.json")
    classes = case["num_classes"]
    loss = EQLV2Loss(num_classes=classes, gamma=case["gamma"], mu=case["mu"],
                     alpha=case["alpha"], job_id=job_id, address=address, stream=stream,
                     overlap=overlap)
    for index, step in enumerate(case["steps"]):
        expected = step["expected"]
        cls_score = torch.tensor(step["cls_score"], dtype=torch.float32).reshape(-1, classes + 1)
        value = loss(cls_score, torch.tensor(step["labels"]))
        assert_bits_equal(value.detach().reshape(1).numpy(), f32([expected["loss"]]),
                          f"step {index} loss")
        result = loss.collect()
        assert result.step == index
        for name in BUFFERS:
            assert_bits_equal(getattr(loss, name).numpy(), f32(expected[name]),
                              f"step {index} {name} buffer")
    loss.close()


def batch(generator, rows, classes):
    scores = torch.randn(rows, classes + 1, generator=generator) * 2 - 1
    labels = torch.randint(0, classes + 1, (rows,), generator=generator)
    return scores, labels


def forward_backward(module, scores, labels):
    scores = scores.clone().requires_grad_()
    value = module(scores, labels)
    value.backward()
    return value.detach(), scores.grad


@pytest.mark.parametrize("arguments", [dict(), dict(gamma=8, mu=0.6, alpha=2.0, loss_weight=3.0)],
                         ids=["defaults", "parameters"])
def test_same_losses_and_gradients_as_mmdetections_eqlv2_loss(address, job_id, arguments):
    classes = 40
    ours = EQLV2Loss(num_classes=classes, job_id=job_id, address=address, **arguments)
    theirs = MmdetEQLV2Loss(num_classes=classes, **arguments)
    generator = torch.Generator().manual_seed(8)
    for index in range(6):
        scores, labels = batch(generator, 128 + 61 * index, classes)
        (our_loss, our_grad), (their_loss, their_grad) = (
            forward_backward(ours, scores, labels), forward_backward(theirs, scores, labels))
        assert torch.equal(our_loss, their_loss), f"step {index}: {our_loss} != {their_loss}"
        assert torch.equal(our_grad, their_grad), f"step {index}: gradient"
        ours.collect()
        for name in BUFFERS:
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), f"{index} {name}"
    assert not torch.equal(ours.pos_neg, torch.full((classes,), 100.0)), "the weights moved"
    scores, _ = batch(generator, 9, classes)
    assert torch.equal(ours.get_activation(scores.clone()), theirs.get_activation(scores.clone()))
    assert ours.get_channel_num(classes) == theirs.get_channel_num(classes) == classes + 1
    ours.close()


def test_the_round_trip_does_not_hold_the_forward(address, job_id):
    """On a job of two ranks where rank 1 has not sent step 0 yet, rank 0's forward of step 0
    returns at once (its contribution waits in the background for the step to complete); the
    next forward, which needs step 0's state for its weights, waits for it."""
    classes = 6
    loss = EQLV2Loss(num_classes=classes, job_id=job_id, address=address, world_size=2, rank=0,
                     step_timeout=60)
    generator = torch.Generator().manual_seed(9)
    scores, labels = batch(generator, 32, classes)
    loss(scores, labels)  # would wait for rank 1 here if the step were not overlapped
    in_flight = loss._mirror.in_flight[1]
    assert not in_flight.done(), "step 0 cannot be complete without rank 1"
    second = threading.Thread(target=loss, args=batch(generator, 32, classes))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive(), "step 1's forward waits for step 0's state"
    with Client(address) as rank1:
        answer = rank1.harmonize_eqlv2(job_id, np.ones(classes), np.ones(classes), step=0, rank=1)
    second.join(timeout=60)
    assert not second.is_alive()
    assert in_flight.result().method_state["pos_neg"].tolist() == answer.method_state[
        "pos_neg"].tolist()
    with Client(address) as rank1:
        rank1.harmonize_eqlv2(job_id, np.ones(classes), np.ones(classes), step=1, rank=1)
    assert loss.collect().step == 1 and loss.collect().steps == 2
    loss.close()


def test_a_deep_copy_with_a_step_in_flight(address, job_id):
    """mmengine's EMAHook deep-copies the model every iteration, also right after a forward: the
    copy and the original share the step in flight, whichever saves first waits for it, and both
    report the job's state after it (as GHMC's copies report the job's live density)."""
    classes = 8
    loss = EQLV2Loss(num_classes=classes, job_id=job_id, address=address)
    generator = torch.Generator().manual_seed(10)
    for _ in range(3):
        forward_backward(loss, *batch(generator, 40, classes))
        twin = copy.deepcopy(loss)
    assert loss._mirror.in_flight is not None, "step 2 still in flight"
    copied, original = twin.state_dict(), loss.state_dict()  # the copy collects the step
    for name in BUFFERS:
        assert torch.equal(copied[name], original[name]), name
    assert int(copied["steps"]) == int(original["steps"]) == 3
    loss.close()
    twin.close()


def steps_of(module, generator, count, classes):
    out = [forward_backward(module, *batch(generator, 120, classes)) for _ in range(count)]
    if isinstance(module, EQLV2Loss):
        module.collect()
    return out


def assert_same_steps(ours, theirs, where):
    for index, ((a, ga), (b, gb)) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b) and torch.equal(ga, gb), f"{where}: step {index}"


def test_a_checkpoint_loads_into_mmdetections_eqlv2_loss(address, job_id):
    classes = 10
    ours = EQLV2Loss(num_classes=classes, job_id=job_id, address=address)
    steps_of(ours, torch.Generator().manual_seed(1), 3, classes)
    forward_backward(ours, *batch(torch.Generator().manual_seed(2), 120, classes))
    saved = ours.state_dict()  # collects the step in flight first
    assert set(saved) == {*BUFFERS, "steps", "elements", "next_step", "run_id"}
    assert int(saved["steps"]) == 4 == int(saved["next_step"])
    job = ours._connection().get_job(job_id)
    for name in BUFFERS:
        assert torch.equal(saved[name], torch.tensor(list(getattr(job.state.eqlv2, name)))), name
    theirs = MmdetEQLV2Loss(num_classes=classes)
    result = theirs.load_state_dict(saved, strict=False)
    assert result.missing_keys == [] and set(result.unexpected_keys) == {
        "steps", "elements", "next_step", "run_id"}
    assert_same_steps(steps_of(ours, torch.Generator().manual_seed(3), 2, classes),
                      steps_of(theirs, torch.Generator().manual_seed(3), 2, classes),
                      "after the checkpoint")
    ours.close()


def test_a_checkpoint_of_mmdetections_eqlv2_loss_resumes_on_ghmd(address, job_id):
    classes = 10
    theirs = MmdetEQLV2Loss(num_classes=classes)
    steps_of(theirs, torch.Generator().manual_seed(4), 3, classes)
    checkpoint = theirs.state_dict()
    assert set(checkpoint) == set(BUFFERS)
    ours = EQLV2Loss(num_classes=classes, job_id=job_id, address=address)
    ours.load_state_dict(checkpoint)
    job = ours._connection().get_job(job_id)
    for name in BUFFERS:
        assert torch.equal(checkpoint[name], torch.tensor(list(getattr(job.state.eqlv2, name))))
    assert_same_steps(steps_of(ours, torch.Generator().manual_seed(5), 3, classes),
                      steps_of(theirs, torch.Generator().manual_seed(5), 3, classes),
                      "after resuming")
    ours.close()


def test_the_mmdetection_config_change_of_the_readme(tmp_path):
    """The README's EQLv2 lines on top of mmdetection's Mask R-CNN (a CrossEntropyLoss head)."""
    lines = readme_config_blocks()[1]
    assert "RemoteEQLV2Loss" in lines
    path = tmp_path / "eqlv2.py"
    path.write_text(f"_base_ = {str(CONFIGS / '_base_' / 'models' / 'mask-rcnn_r50_fpn.py')!r}\n"
                    'custom_imports = dict(imports=["ghmd.mmdet"], allow_failed_imports=False)\n'
                    + lines)
    config = Config.fromfile(str(path))
    config.model.roi_head.bbox_head.num_classes = 1203
    head = MODELS.build(config.model.roi_head.bbox_head)
    assert type(head.loss_cls) is EQLV2Loss and head.loss_cls.job_id == "lvis-eqlv2/cls"
    assert head.fc_cls.out_features == 1203 + 1 == head.loss_cls.get_channel_num(1203)


def test_the_registry_builds_it(address, job_id):
    loss = MODELS.build(dict(type="RemoteEQLV2Loss", num_classes=1203, use_distributed=True,
                             job_id=job_id, address=address))
    assert type(loss) is EQLV2Loss and loss.use_distributed and loss.num_classes == 1203
    loss.close()


def test_what_a_user_can_get_wrong(client, address, job_id):
    classes = 5
    loss = EQLV2Loss(num_classes=classes, job_id=job_id, address=address)
    with pytest.raises(ValueError, match="cls_score has 5 columns.*needs 6"):
        loss(torch.zeros(3, classes), torch.tensor([0, 1, 2]))
    # A non-finite logit makes a non-finite contribution: the server refuses it, and the error
    # arrives where the step's answer is collected.
    scores = torch.zeros(3, classes + 1)
    scores[1, 2] = float("nan")
    loss(scores, torch.tensor([0, 1, 2]))
    with pytest.raises(GhmdError) as refused:
        loss.collect()
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "eqlv2.neg_grad[2]" in refused.value.message or "eqlv2.pos_grad[2]" in (
        refused.value.message)
    assert client.get_job(job_id).state.steps == 0
    loss(torch.zeros(3, classes + 1), torch.tensor([0, 1, 2]))  # the same step, again
    assert loss.collect().step == 0 and client.get_job(job_id).state.steps == 1

    with pytest.raises(GhmdError) as short:
        client.harmonize_eqlv2(job_id, np.zeros(classes - 1), np.zeros(classes))
    assert short.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "eqlv2.pos_grad" in short.value.message
    with pytest.raises(GhmdError) as negative:
        client.harmonize_eqlv2(job_id, np.zeros(classes), -np.ones(classes))
    assert "eqlv2.neg_grad[0]" in negative.value.message
    with pytest.raises(GhmdError) as other_method:
        client.harmonize_seesaw(job_id, label_counts=np.ones(classes + 1, np.int64))
    assert other_method.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "eqlv2" in other_method.value.message
    assert client.get_job(job_id).state.steps == 1
    with pytest.raises(GhmdError) as different:
        client.create_job(job_id, eqlv2=dict(num_classes=classes, gamma=3.0),
                          run_id=loss._job.run_id)
    assert different.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(ValueError, match="eqlv2 and seesaw: a job runs one method"):
        client.create_job(job_id + "-x", seesaw=dict(num_classes=3), eqlv2=dict(num_classes=3))
    with pytest.raises(ValueError, match="'focal' is not a method: use one of seesaw, eqlv2"):
        client.create_job(job_id + "-x", focal=dict(num_classes=3))
    loss.close()
