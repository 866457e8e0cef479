"""Seesaw on ghmd with one process, against a real server: every step of the conformance vectors
(tests/data/conformance/seesaw_*.json) through Client and through ghmd.torch.SeesawLoss, bit for
bit; losses and gradients bit for bit against mmdetection 3.3's own SeesawLoss, alone and inside
its bbox head; checkpoints both ways; the registry; what a user can get wrong."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from conftest import CONFORMANCE, REPO_ROOT, load_case
from mmdet_support import CONFIGS
from mmdet.models.losses.seesaw_loss import SeesawLoss as MmdetSeesawLoss
from mmdet.registry import MODELS
from mmengine.config import Config
from test_conformance import assert_bits_equal, f32

import ghmd.mmdet  # noqa: F401  (registers the Remote* names, as custom_imports does)
from ghmd import GhmdError
from ghmd.torch import SeesawLoss

CASES = sorted(CONFORMANCE.glob("seesaw_*.json"))


def counts_of(case, step):
    """A step's C + 1 label counts (seesaw_c5_counts_large lists C: no background sample)."""
    counts = list(step["expected"]["label_counts"])
    return np.array(counts + [0] * (case["num_classes"] + 1 - len(counts)), dtype=np.int64)


def create(client, job_id, case, **options):
    return client.create_job(job_id, seesaw=dict(num_classes=case["num_classes"], p=case["p"],
                                                 q=case["q"], eps=case["eps"]), **options)


def test_the_repository_has_the_seesaw_cases():
    assert {path.stem for path in CASES} >= {"seesaw_c20_sequence", "seesaw_c5_counts_large"}


@pytest.mark.parametrize("transport", ["unary", "stream"])
@pytest.mark.parametrize("path", CASES, ids=lambda path: path.stem)
def test_case_through_harmonize(client, job_id, path, transport):
    case = load_case(path)
    classes = case["num_classes"]
    job = create(client, job_id, case)
    assert (job.spec.seesaw.num_classes, job.spec.seesaw.p, job.spec.seesaw.q,
            job.spec.seesaw.eps) == (classes, case["p"], case["q"], case["eps"])
    assert list(job.state.seesaw.cum_samples) == [0.0] * (classes + 1)
    with client.stream() as session:
        send = client if transport == "unary" else session
        for index, step in enumerate(case["steps"]):
            result = send.harmonize_seesaw(job_id, label_counts=counts_of(case, step), step=index)
            assert result.method == "seesaw" and result.steps == index + 1
            assert result.bin_weights.size == 0 and result.weights.size == 0
            assert_bits_equal(result.method_state["cum_samples"],
                              f32(step["expected"]["cum_samples"]), f"{path.stem} step {index}")
    state = client.get_job(job_id).state
    assert state.steps == len(case["steps"])
    assert state.elements == sum(int(counts_of(case, step).sum()) for step in case["steps"])
    assert_bits_equal(np.array(state.seesaw.cum_samples, dtype=np.float32),
                      f32(case["steps"][-1]["expected"]["cum_samples"]), "GetJob")


def test_the_server_counts_labels_as_the_reference_does(client, job_id):
    case = load_case(CONFORMANCE / "seesaw_c20_sequence.json")
    create(client, job_id, case)
    for index, step in enumerate(case["steps"]):
        result = client.harmonize_seesaw(job_id, labels=np.array(step["labels"]), step=index)
        assert_bits_equal(result.method_state["cum_samples"],
                          f32(step["expected"]["cum_samples"]), f"step {index}")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_the_vectors_losses_through_seesaw_loss(address, job_id, stream):
    case = load_case(CONFORMANCE / "seesaw_c20_sequence.json")
    classes = case["num_classes"]
    loss = SeesawLoss(p=case["p"], q=case["q"], num_classes=classes, eps=case["eps"],
                      job_id=job_id, address=address, stream=stream)
    for index, step in enumerate(case["steps"]):
        expected = step["expected"]
        cls_score = torch.tensor(step["cls_score"], dtype=torch.float32).reshape(-1, classes + 2)
        losses = loss(cls_score, torch.tensor(step["labels"]), torch.tensor(step["label_weights"]))
        assert list(losses) == ["loss_cls_objectness", "loss_cls_classes"]
        for name in ("loss_cls_classes", "loss_cls_objectness"):
            got = losses[name].detach().reshape(1).numpy()
            assert_bits_equal(got, f32([expected[name]]), f"step {index} {name}")
        assert_bits_equal(loss.cum_samples.numpy(), f32(expected["cum_samples"]),
                          f"step {index} cum_samples buffer")
        assert loss.last_result.step == index
    loss.close()


def batch(generator, rows, classes, background=0.5):
    scores = torch.randn(rows, classes + 2, generator=generator) * 3
    labels = torch.randint(0, classes + 1, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < background] = classes
    label_weights = (torch.rand(rows, generator=generator) > 0.2).float()
    return scores, labels, label_weights


def forward_backward(module, scores, labels, label_weights, **kwargs):
    scores = scores.clone().requires_grad_()
    losses = module(scores, labels, label_weights, **kwargs)
    parts = losses.values() if isinstance(losses, dict) else [losses]
    sum(part.sum() for part in parts).backward()
    detached = ({key: value.detach() for key, value in losses.items()}
                if isinstance(losses, dict) else losses.detach())
    return detached, scores.grad


def assert_same(ours, theirs, where):
    (our_losses, our_grad), (their_losses, their_grad) = ours, theirs
    if isinstance(their_losses, dict):
        assert list(our_losses) == list(their_losses), where
        for key in their_losses:
            assert torch.equal(our_losses[key], their_losses[key]), f"{where}: {key}"
    else:
        assert torch.equal(our_losses, their_losses), where
    assert torch.equal(our_grad, their_grad), f"{where}: gradient"


ARGUMENTS = [
    dict(),
    dict(return_dict=False, loss_weight=2.5),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(p=0.0),
    dict(q=0.0, eps=0.05),
    dict(p=1.5, q=0.5),
]


@pytest.mark.parametrize("arguments", ARGUMENTS, ids=lambda a: ",".join(map(str, a.items())) or
                         "defaults")
def test_same_losses_and_gradients_as_mmdetections_seesaw_loss(address, job_id, arguments):
    classes = 30
    ours = SeesawLoss(num_classes=classes, job_id=job_id, address=address, **arguments)
    theirs = MmdetSeesawLoss(num_classes=classes, **arguments)
    generator = torch.Generator().manual_seed(7)
    for index in range(5):
        scores, labels, label_weights = batch(generator, 200 + 37 * index, classes)
        kwargs = {}
        if index % 2 and arguments.get("reduction", "mean") != "sum":
            kwargs["avg_factor"] = float((label_weights > 0).sum())  # as BBoxHead.loss
        if index == 3:
            label_weights = None
        if index == 4:
            labels[:] = classes  # background only: the class loss is 0, as theirs
        assert_same(forward_backward(ours, scores, labels, label_weights, **kwargs),
                    forward_backward(theirs, scores, labels, label_weights, **kwargs),
                    f"step {index}")
        assert torch.equal(ours.cum_samples, theirs.cum_samples), f"step {index}"
    scores, labels, _ = batch(generator, 9, classes)
    assert torch.equal(ours.get_activation(scores), theirs.get_activation(scores))
    our_accuracy, their_accuracy = ours.get_accuracy(scores, labels), theirs.get_accuracy(
        scores, labels)
    assert our_accuracy.keys() == their_accuracy.keys()
    for key in their_accuracy:
        assert torch.equal(our_accuracy[key], their_accuracy[key]), key
    assert ours.get_cls_channels(classes) == theirs.get_cls_channels(classes) == classes + 2
    for name in ("custom_cls_channels", "custom_activation", "custom_accuracy"):
        assert getattr(ours, name) is getattr(theirs, name) is True, name
    ours.close()


def bbox_head(loss_cls, classes):
    torch.manual_seed(3)
    return MODELS.build(dict(type="Shared2FCBBoxHead", in_channels=4, fc_out_channels=16,
                             roi_feat_size=2, num_classes=classes, reg_class_agnostic=True,
                             loss_cls=loss_cls))


def test_inside_mmdetections_bbox_head(address, job_id):
    """mmdetection's Shared2FCBBoxHead reads the loss's custom_* attributes: C + 2 classifier
    outputs (get_cls_channels), the accuracies (get_accuracy), the scores (get_activation)."""
    classes = 12
    ours = bbox_head(dict(type="RemoteSeesawLoss", num_classes=classes, job_id=job_id,
                          address=address), classes)
    theirs = bbox_head(dict(type="SeesawLoss", num_classes=classes), classes)
    assert isinstance(ours.loss_cls, SeesawLoss)
    assert ours.fc_cls.out_features == theirs.fc_cls.out_features == classes + 2
    generator = torch.Generator().manual_seed(4)
    for index in range(3):
        rows = 64
        features = torch.randn(rows, 4, 2, 2, generator=generator)
        labels = torch.randint(0, classes + 1, (rows,), generator=generator)
        label_weights = torch.ones(rows)
        targets, rois = torch.randn(rows, 4, generator=generator), torch.rand(rows, 5)
        results = []
        for head in (ours, theirs):
            head.zero_grad()
            cls_score, bbox_pred = head(features)
            losses = head.loss(cls_score, bbox_pred, rois, labels, label_weights, targets,
                               torch.ones(rows, 4))
            sum(value for key, value in losses.items() if key.startswith("loss")).backward()
            scores = head.loss_cls.get_activation(cls_score.detach())
            results.append((losses, scores, head.fc_cls.weight.grad.clone()))
        (our_losses, our_scores, our_grad), (their_losses, their_scores, their_grad) = results
        assert set(our_losses) == set(their_losses) >= {"acc_objectness", "acc_classes",
                                                        "loss_cls_classes"}
        for key, value in their_losses.items():
            assert torch.equal(our_losses[key], value), f"step {index}: {key}"
        assert torch.equal(our_scores, their_scores) and our_scores.shape == (rows, classes + 1)
        assert torch.equal(our_grad, their_grad), f"step {index}: classifier gradient"
    ours.loss_cls.close()


def steps_of(module, generator, count, classes):
    return [forward_backward(module, *batch(generator, 150, classes)) for _ in range(count)]


def assert_go_on_alike(ours, theirs, seed, classes, where):
    for index, (a, b) in enumerate(zip(
            steps_of(ours, torch.Generator().manual_seed(seed), 2, classes),
            steps_of(theirs, torch.Generator().manual_seed(seed), 2, classes))):
        assert_same(a, b, f"step {index} {where}")


def test_a_checkpoint_loads_into_mmdetections_seesaw_loss(address, job_id):
    classes = 16
    ours = SeesawLoss(num_classes=classes, job_id=job_id, address=address)
    steps_of(ours, torch.Generator().manual_seed(1), 3, classes)
    saved = ours.state_dict()
    assert set(saved) == {"cum_samples", "steps", "elements", "next_step", "run_id"}
    assert int(saved["steps"]) == 3 == int(saved["next_step"])
    assert int(saved["elements"]) == 3 * 150 == int(saved["cum_samples"].sum())
    theirs = MmdetSeesawLoss(num_classes=classes)
    result = theirs.load_state_dict(saved, strict=False)  # as mmengine's load_checkpoint
    assert result.missing_keys == [] and set(result.unexpected_keys) == {
        "steps", "elements", "next_step", "run_id"}
    assert torch.equal(theirs.cum_samples, ours.cum_samples)
    assert_go_on_alike(ours, theirs, 2, classes, "after the checkpoint")
    ours.close()


def test_a_checkpoint_of_mmdetections_seesaw_loss_resumes_on_ghmd(address, job_id):
    classes = 16
    theirs = MmdetSeesawLoss(num_classes=classes)
    steps_of(theirs, torch.Generator().manual_seed(5), 4, classes)
    checkpoint = theirs.state_dict()
    assert set(checkpoint) == {"cum_samples"}
    ours = SeesawLoss(num_classes=classes, job_id=job_id, address=address)
    ours.load_state_dict(checkpoint)  # strict: mmdetection's buffers are all it needs
    job = ours._connection().get_job(job_id)
    assert_bits_equal(np.array(job.state.seesaw.cum_samples, dtype=np.float32),
                      checkpoint["cum_samples"].numpy(), "the restored job")
    assert job.state.steps == 0 and job.state.elements == 4 * 150
    assert_go_on_alike(ours, theirs, 6, classes, "after resuming")
    ours.close()


def readme_config_blocks():
    """The README's mmdetection config blocks for Seesaw and EQLv2, verbatim, in order."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("**mmdetection: Seesaw and EQLv2.**"):]
    section = section[:section.index("**Distributed.**")]
    return [block.split("```")[0] for block in section.split("```python\n")[1:]]


def test_the_mmdetection_config_change_of_the_readme(tmp_path):
    """The README's lines on top of mmdetection's own LVIS Seesaw config (whose base loss_cls is
    a CrossEntropyLoss: its keys merge into ours, and ours takes them)."""
    lines = readme_config_blocks()[0]
    assert "RemoteSeesawLoss" in lines and "ghmd.mmdet" in lines
    base = CONFIGS / "seesaw_loss" / "mask-rcnn_r50_fpn_seesaw-loss_random-ms-2x_lvis-v1.py"
    path = tmp_path / "seesaw.py"
    path.write_text(f"_base_ = {str(base)!r}\n" + lines)
    config = Config.fromfile(str(path))
    head = MODELS.build(config.model.roi_head.bbox_head)
    assert type(head.loss_cls) is SeesawLoss and head.loss_cls.num_classes == 1203
    assert head.loss_cls.job_id == "lvis-seesaw/cls" and head.fc_cls.out_features == 1203 + 2


def test_what_a_user_can_get_wrong(client, address, job_id):
    classes = 5
    loss = SeesawLoss(num_classes=classes, job_id=job_id, address=address)
    scores = torch.zeros(4, classes + 2)
    with pytest.raises(ValueError, match=r"labels\[2\] = 6: labels are 0 to 5 \(5 is the "):
        loss(scores, torch.tensor([0, 5, 6, -1]))
    with pytest.raises(ValueError, match=r"labels\[3\] = -1"):
        loss(scores, torch.tensor([0, 5, 1, -1]))
    with pytest.raises(ValueError, match="cls_score has 6 columns.*needs 7"):
        loss(torch.zeros(4, classes + 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(NotImplementedError, match="use_sigmoid=False"):
        SeesawLoss(use_sigmoid=True, job_id=job_id)
    with pytest.raises(TypeError, match="gamma=2.0"):
        SeesawLoss(gamma=2.0, job_id=job_id)
    loss(scores, torch.tensor([0, 5, 1, 1]))
    assert client.get_job(job_id).state.steps == 1

    # The server's refusals, each naming the field, and nothing changes.
    with pytest.raises(GhmdError) as short:
        client.harmonize_seesaw(job_id, label_counts=np.ones(classes, np.int64))
    assert short.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "seesaw.label_counts has 5 entries" in short.value.message
    with pytest.raises(GhmdError) as other_method:
        client.harmonize_eqlv2(job_id, np.zeros(classes), np.zeros(classes))
    assert other_method.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "seesaw" in other_method.value.message and "eqlv2" in other_method.value.message
    with pytest.raises(GhmdError) as label:
        client.harmonize_seesaw(job_id, labels=np.array([0, 1, 7]))
    assert "seesaw.labels[2] = 7" in label.value.message
    with pytest.raises(ValueError, match=r"seesaw.label_counts\[1\] = -2: cannot be negative"):
        client.harmonize_seesaw(job_id, label_counts=np.array([1, -2, 0, 0, 0, 0]))
    state = client.get_job(job_id).state
    assert state.steps == 1 and list(state.seesaw.cum_samples) == [1, 2, 0, 0, 0, 1]

    with pytest.raises(GhmdError) as bad_p:
        client.create_job(job_id + "-p", seesaw=dict(num_classes=3, p=-1.0))
    assert bad_p.value.code == grpc.StatusCode.INVALID_ARGUMENT and "p" in bad_p.value.message
    with pytest.raises(GhmdError) as different:
        client.create_job(job_id, seesaw=dict(num_classes=classes, q=3.0),
                          run_id=loss._job.run_id)
    assert different.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(ValueError, match="bins: GHM's parameters"):
        client.create_job(job_id + "-x", bins=10, seesaw=dict(num_classes=3))
    with pytest.raises(ValueError, match="unknown field"):
        client.create_job(job_id + "-x", seesaw=dict(num_classes=3, gamma=1.0))
    loss.close()
