"""register_mmdet() against a minimal stand-in for mmdetection's registry (mmdetection itself is
too heavy to install for a test): the names, the config keys mmdetection passes, and the
custom_imports module."""

from __future__ import annotations

import importlib
import sys
import types

import pytest

import ghmd.torch
from ghmd.torch import GHMC, GHMR, EQLV2Loss, SeesawLoss, register_mmdet

NAMES = {"RemoteGHMC": GHMC, "RemoteGHMR": GHMR, "RemoteSeesawLoss": SeesawLoss,
         "RemoteEQLV2Loss": EQLV2Loss}


class FakeRegistry:
    """The part of mmengine's Registry that mmdetection's builders use."""

    def __init__(self):
        self.modules = {}

    def register_module(self, name=None, force=False, module=None):
        if name in self.modules and not force:
            raise KeyError(f"{name} is already registered")
        self.modules[name] = module
        return module

    def build(self, cfg):
        cfg = dict(cfg)
        return self.modules[cfg.pop("type")](**cfg)


@pytest.fixture
def fake_mmdet(monkeypatch):
    registry = FakeRegistry()
    mmdet = types.ModuleType("mmdet")
    mmdet_registry = types.ModuleType("mmdet.registry")
    mmdet_registry.MODELS = registry
    mmdet.registry = mmdet_registry
    monkeypatch.setitem(sys.modules, "mmdet", mmdet)
    monkeypatch.setitem(sys.modules, "mmdet.registry", mmdet_registry)
    monkeypatch.delitem(sys.modules, "ghmd.mmdet", raising=False)
    return registry


def test_register_mmdet_registers_every_loss(fake_mmdet):
    assert register_mmdet() is fake_mmdet
    assert fake_mmdet.modules == NAMES
    register_mmdet()  # again: harmless
    # A config as mmdetection's retinanet_ghm config writes it, plus the job's id and address.
    loss_cls = fake_mmdet.build(dict(type="RemoteGHMC", bins=30, momentum=0.75, use_sigmoid=True,
                                     loss_weight=1.0, job_id="retina/run1", address="ghmd:50051"))
    assert isinstance(loss_cls, GHMC)
    assert (loss_cls.bins, loss_cls.momentum, loss_cls.job_id, loss_cls.address) == (
        30, 0.75, "retina/run1", "ghmd:50051")
    loss_bbox = fake_mmdet.build(dict(type="RemoteGHMR", mu=0.02, bins=10, momentum=0.7,
                                      loss_weight=10.0, job_id="retina/run1-bbox"))
    assert isinstance(loss_bbox, GHMR) and loss_bbox.loss_weight == 10.0
    # mmdetection's LVIS configs: Seesaw replaces a CrossEntropyLoss, whose keys merge in.
    seesaw = fake_mmdet.build(dict(type="RemoteSeesawLoss", p=0.8, q=2.0, num_classes=1203,
                                   loss_weight=1.0, use_sigmoid=False, job_id="lvis/cls"))
    assert isinstance(seesaw, SeesawLoss) and seesaw.num_classes == 1203
    eqlv2 = fake_mmdet.build(dict(type="RemoteEQLV2Loss", num_classes=1203, use_sigmoid=True,
                                  loss_weight=1.0, job_id="lvis/eqlv2"))
    assert isinstance(eqlv2, EQLV2Loss) and eqlv2.gamma == 12


def test_custom_imports_module_registers_on_import(fake_mmdet):
    importlib.import_module("ghmd.mmdet")
    assert set(fake_mmdet.modules) == set(NAMES)


def test_an_explicit_registry(fake_mmdet):
    other = FakeRegistry()
    register_mmdet(other)
    assert set(other.modules) == set(NAMES) and not fake_mmdet.modules


def test_without_mmdetection_the_error_says_so(monkeypatch):
    for name in ("mmdet", "mmdet.registry", "mmdet.models", "mmdet.models.builder"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError
    with pytest.raises(ImportError, match="mmdetection"):
        ghmd.torch.register_mmdet()
