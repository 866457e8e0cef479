"""Real mmdetection 3.3 (mmengine 0.10.7, mmcv-lite 2.1.0) for the tests, and what they share.

The one stand-in: ``mmcv._ext``. mmcv-lite is mmcv without its compiled ops, and mmdet.models
imports mmcv.ops, whose loader asserts at import that ``mmcv._ext`` has every op it names. The
code these tests run (ResNet, FPN, RetinaNet's head, the assigner, the losses, mmengine's Runner)
calls none of them, so the stand-in gives each name a function that raises NotImplementedError:
a test that ever reaches a compiled op fails, naming it, instead of computing something else.
Everything else is mmdetection's own code, installed from PyPI (requirements-ci.txt).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import torch


def _install_mmcv_ext_stand_in() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

    def compiled_op(name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def absent(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is a compiled op, absent from mmcv-lite")

        return absent

    ext.__getattr__ = compiled_op
    sys.modules["mmcv._ext"] = ext


_install_mmcv_ext_stand_in()

import mmdet  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

register_all_modules()  # mmdetection's scope, as its tools/train.py does
# One intra-op thread: the CI machine has two cores shared with the server and other jobs, and
# an oversubscribed torch is several times slower; the bits compared here do not depend on it.
torch.set_num_threads(1)

#: mmdetection's own configs, shipped in its wheel.
CONFIGS = Path(mmdet.__file__).resolve().parent / ".mim" / "configs"
RETINANET_R18 = CONFIGS / "retinanet" / "retinanet_r18_fpn_1x_coco.py"


def ghm_losses(kind: str, job_id: str = "", address: str = "") -> str:
    """The config lines of a RetinaNet with GHM: mmdetection's own classes (kind "mmdet", as its
    configs/ghm/retinanet_r50_fpn_ghm-1x_coco.py writes them) or ghmd's (kind "ghmd", the
    README's lines, with the job's id and the server's address)."""
    if kind == "mmdet":
        names, cls_job, bbox_job = ("GHMC", "GHMR"), "", ""
    else:
        names = ("RemoteGHMC", "RemoteGHMR")
        cls_job = f", address={address!r}, job_id={job_id!r}"
        bbox_job = f", address={address!r}, job_id={job_id + '/bbox'!r}"
    return (
        "bbox_head=dict(\n"
        f"    loss_cls=dict(_delete_=True, type={names[0]!r}, bins=30, momentum=0.75,"
        f" use_sigmoid=True, loss_weight=1.0{cls_job}),\n"
        f"    loss_bbox=dict(_delete_=True, type={names[1]!r}, mu=0.02, bins=10, momentum=0.7,"
        f" loss_weight=10.0{bbox_job}))"
    )


def write_config(directory: Path, name: str, head: str, base: Path = RETINANET_R18) -> Path:
    """A config file on top of one of mmdetection's: a small RetinaNet (ResNet-18 without
    pretrained weights, so nothing downloads), ghmd's custom_imports line, and ``head``, the
    model's bbox_head entry (``ghm_losses``)."""
    path = directory / f"{name}.py"
    path.write_text(
        f"_base_ = {str(base)!r}\n"
        'custom_imports = dict(imports=["ghmd.mmdet"], allow_failed_imports=False)\n'
        f"model = dict(backbone=dict(init_cfg=None), {head})\n"
    )
    return path


def tiny_batch(seed: int, images: int = 2, size: int = 64):
    """A detection batch as the data pipeline gives it: uint8 images and their boxes."""
    generator = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(images):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8))
        count = 3
        corner = torch.rand(count, 2, generator=generator) * (size * 0.6)
        extent = 8 + torch.rand(count, 2, generator=generator) * (size * 0.35)
        sample = DetDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size),
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([corner, (corner + extent).clamp(max=size - 1)], dim=1),
            labels=torch.randint(0, 80, (count,), generator=generator),
        )
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)
