"""ghmd's losses inside real mmdetection 3.3, as users run them (issue 13): a RetinaNet
(ResNet-18, FPN) built from a config through mmdetection's registry with the README's
custom_imports line, trained against the same network with mmdetection's own GHMC/GHMR; the
README's lines on a plain RetinaNet config; mmengine's Runner with CheckpointHook and a resume.
The only stand-in is mmcv-lite's missing compiled ops (see mmdet_support)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO_ROOT
from mmdet_support import CONFIGS, ghm_losses, tiny_batch, write_config
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

import ghmd.torch

ITERATIONS = 3


def build(path):
    config = Config.fromfile(str(path))  # imports custom_imports, as mmdetection's tools do
    torch.manual_seed(0)
    return MODELS.build(config.model)


def test_retinanet_trains_bit_for_bit_as_with_mmdetections_own_ghm(tmp_path, address, job_id):
    ours = build(write_config(tmp_path, "ghmd", ghm_losses("ghmd", job_id, address)))
    theirs = build(write_config(tmp_path, "mmdet", ghm_losses("mmdet")))
    assert isinstance(ours.bbox_head.loss_cls, ghmd.torch.GHMC)
    assert isinstance(ours.bbox_head.loss_bbox, ghmd.torch.GHMR)
    assert type(theirs.bbox_head.loss_cls).__module__ == "mmdet.models.losses.ghm_loss"
    parameters = dict(ours.named_parameters())
    their_parameters = dict(theirs.named_parameters())
    assert parameters.keys() == their_parameters.keys()
    for name, value in parameters.items():
        assert torch.equal(value, their_parameters[name]), f"{name} differs before training"

    optimizers = [torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                  for model in (ours, theirs)]
    for iteration in range(ITERATIONS):
        results = []
        for model, optimizer in zip((ours, theirs), optimizers):
            data = model.data_preprocessor(tiny_batch(seed=iteration), training=True)
            losses = model(**data, mode="loss")
            loss, _ = model.parse_losses(losses)
            optimizer.zero_grad()
            loss.backward()
            results.append((losses, {name: p.grad.clone() for name, p in model.named_parameters()
                                     if p.grad is not None}))
            optimizer.step()
        (our_losses, our_grads), (their_losses, their_grads) = results
        assert set(our_losses) == {"loss_cls", "loss_bbox"} == set(their_losses)
        for kind in our_losses:
            assert len(our_losses[kind]) == 5  # one per FPN level
            for level, (a, b) in enumerate(zip(our_losses[kind], their_losses[kind])):
                where = f"iteration {iteration}, {kind} level {level}"
                assert torch.isfinite(a) and torch.equal(a, b), f"{where}: {a} != {b}"
        assert our_grads.keys() == their_grads.keys() and len(our_grads) > 50
        for name, grad in our_grads.items():
            assert torch.equal(grad, their_grads[name]), f"iteration {iteration}: grad of {name}"
    for kind in ("loss_cls", "loss_bbox"):
        ours_loss, their_loss = getattr(ours.bbox_head, kind), getattr(theirs.bbox_head, kind)
        assert torch.equal(ours_loss.acc_sum, their_loss.acc_sum), kind
        assert ours_loss.last_result.step == ITERATIONS * 5 - 1  # a step per level


def readme_config_lines() -> str:
    """The README's mmdetection config lines, verbatim."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("**mmdetection: the config change.**"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n")]


def test_the_readme_lines_on_a_plain_retinanet_config(tmp_path):
    """retinanet_r50_fpn_1x_coco.py has FocalLoss, whose gamma and alpha mmengine would merge
    into the new dict: the README's lines, as written, replace it (_delete_=True) and build
    ghmd's losses; without that key the error says what to write."""
    base = CONFIGS / "retinanet" / "retinanet_r50_fpn_1x_coco.py"
    assert Config.fromfile(str(base)).model.bbox_head.loss_cls.type == "FocalLoss"
    lines = readme_config_lines()
    assert "_delete_=True" in lines and "ghmd.mmdet" in lines
    path = tmp_path / "readme.py"
    path.write_text(f"_base_ = {str(base)!r}\n" + lines)
    model = build(path)
    loss_cls, loss_bbox = model.bbox_head.loss_cls, model.bbox_head.loss_bbox
    assert (type(loss_cls), loss_cls.bins, loss_cls.momentum, loss_cls.job_id) == (
        ghmd.torch.GHMC, 30, 0.75, "retinanet-ghm/cls")
    assert (type(loss_bbox), loss_bbox.mu, loss_bbox.loss_weight) == (ghmd.torch.GHMR, 0.02, 10.0)

    path.write_text(f"_base_ = {str(base)!r}\n" + lines.replace("_delete_=True, ", ""))
    with pytest.raises(TypeError) as error:
        build(path)
    message = str(error.value)
    assert "gamma=2.0" in message and "alpha=0.25" in message and "_delete_=True" in message


class TinyDetection(torch.utils.data.Dataset):
    """Four fixed images with boxes, in the form mmdetection's pipeline hands to the model."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        batch = tiny_batch(seed=100 + index, images=1)
        return dict(inputs=batch["inputs"][0], data_samples=batch["data_samples"][0])


class RecordLosses(Hook):
    """Every iteration's scalar loss, by the iteration's number from 1, as the Runner logs it."""

    def __init__(self):
        self.losses = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter + 1] = outputs["loss"].item()


def runner_for(tmp_path, work_dir, job_id, address, **kwargs):
    config = Config.fromfile(str(write_config(tmp_path, "runner", ghm_losses("ghmd", job_id,
                                                                                address))))
    runner = Runner(
        model=config.model,
        work_dir=str(work_dir),
        train_dataloader=dict(batch_size=2, num_workers=0, dataset=TinyDetection(),
                              sampler=dict(type="DefaultSampler", shuffle=False),
                              collate_fn=dict(type="pseudo_collate")),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=4),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=1e-3, momentum=0.9)),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False)),
        randomness=dict(seed=0),
        default_scope="mmdet",
        **kwargs,
    )
    recorder = RecordLosses()
    runner.register_hook(recorder, priority="LOWEST")
    return runner, recorder


def test_runner_checkpoint_and_resume_continue_the_density(tmp_path, address, job_id,
                                                           monkeypatch):
    """mmengine's Runner trains 4 iterations with a checkpoint every 2; a second Runner resumes
    from iteration 2 (weights, optimizer, and ghmd's density through the loss's state_dict) and
    gives iterations 3 and 4 the same losses and the same final weights, bit for bit."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mmengine's resume, torch >= 2.6
    first, first_losses = runner_for(tmp_path, tmp_path / "first", job_id, address)
    first.train()
    assert sorted(first_losses.losses) == [1, 2, 3, 4]
    checkpoint = tmp_path / "first" / "iter_2.pth"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert int(saved["bbox_head.loss_cls.steps"]) == 2 * 5  # 5 FPN levels per iteration
    head = first.model.bbox_head

    resumed, resumed_losses = runner_for(tmp_path, tmp_path / "resumed", job_id, address,
                                         resume=True, load_from=str(checkpoint))
    resumed.train()
    assert sorted(resumed_losses.losses) == [3, 4]
    for iteration in (3, 4):
        assert resumed_losses.losses[iteration] == first_losses.losses[iteration], iteration
    for (name, a), (_, b) in zip(first.model.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.model.bbox_head.loss_cls.last_result.step == head.loss_cls.last_result.step
