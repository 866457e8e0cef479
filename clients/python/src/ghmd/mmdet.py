"""Importing this module registers ``RemoteGHMC``, ``RemoteGHMR``, ``RemoteSeesawLoss`` and
``RemoteEQLV2Loss`` with mmdetection.

It exists for mmdetection's ``custom_imports``, which imports modules by name:

    custom_imports = dict(imports=["ghmd.mmdet"], allow_failed_imports=False)
"""

from .torch import register_mmdet

register_mmdet()
