"""Reference architectures for the data here (1-channel 28x28 / 32x32 images).

    model = ts.models.create("vgg16", width=0.5)     # model.tensorslim_arch records the kwargs
    ts.models.list_models()                          # ['resnet18', 'resnet20', 'vgg16']
    ts.models.load_pretrained("vgg16")               # weights shipped in tensorslim/weights/
"""
from __future__ import annotations

from tensorslim.models.checkpoint import (
    WEIGHTS_DIR,
    available_pretrained,
    checkpoint_info,
    load_checkpoint,
    load_pretrained,
    pretrained_info,
    save_checkpoint,
)
from tensorslim.models.registry import create, list_models, model_kwargs, register
from tensorslim.models.resnet import BasicBlock, ResNet, resnet18, resnet20
from tensorslim.models.vgg import VGG, VGG16_CFG, vgg16

__all__ = [
    "WEIGHTS_DIR", "available_pretrained", "checkpoint_info", "load_checkpoint",
    "load_pretrained", "pretrained_info", "save_checkpoint", "create", "list_models",
    "model_kwargs", "register", "BasicBlock", "ResNet", "resnet18", "resnet20", "VGG",
    "VGG16_CFG", "vgg16",
]
