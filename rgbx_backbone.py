"""Two-branch ResNet backbone: own stem input conv per modality, shared convolutions, per-modality norms.

RGB and aux each have their own 7x7 stem input conv (the aux conv starts from the RGB conv's weights, averaged
over the RGB input channels and repeated over the aux channels, scaled by 3/aux_ch so the activation scale is
kept; for aux_ch == 3 it is a copy). After the stem both modalities run through the SAME convolution weights:
the two feature maps are stacked on the batch axis, so every conv is one call and one tensor, and every norm
layer is a :class:`DualNorm` that normalises each half with its own statistics and affine parameters.

Stages: 2, 3, 4, 5 at strides 4, 8, 16, 32 (torchvision's layer1..layer4).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["RGBXBackbone", "DualNorm", "BACKBONES", "STAGE_STRIDES", "torchvision_weights_file"]

# name -> channels of stages 2..5
BACKBONES: Dict[str, Tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "wide_resnet50_2": (256, 512, 1024, 2048),
}
STAGE_STRIDES = {2: 4, 3: 8, 4: 16, 5: 32}


def _torchvision():
    import torchvision  # imported lazily: only the backbone needs it
    return torchvision


def torchvision_weights_file(name: str) -> Tuple[object, str]:
    """The default ImageNet weights enum of a torchvision ResNet and the cache file torchvision reads."""
    weights = _torchvision().models.get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    return weights, os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _load_pretrained(name: str) -> Dict[str, torch.Tensor]:
    weights, cached = torchvision_weights_file(name)
    try:
        # torchvision's weights API reads the hub cache first and downloads only when the file is missing.
        return weights.get_state_dict(progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated file is a RuntimeError
        raise RuntimeError(
            f"could not obtain ImageNet weights for {name}: torchvision looked for {cached} and could not "
            f"download {weights.url} ({exc}). Copy that file there, or pass a local torchvision-format state "
            f"dict with --backbone_weights PATH (config.backbone_weights), or train with pretrained=False."
        ) from exc


class DualNorm(nn.Module):
    """Two norms for a batch stacked as [rgb; aux]: the first half uses ``rgb``, the second ``aux``."""

    def __init__(self, rgb: nn.Module, aux: nn.Module):
        super().__init__()
        self.rgb, self.aux = rgb, aux

    def forward(self, x):
        half = x.shape[0] // 2
        return torch.cat([self.rgb(x[:half]), self.aux(x[half:])], dim=0)


def _make_norm(bn: nn.BatchNorm2d, kind: str) -> nn.Module:
    if kind == "bn":
        return copy.deepcopy(bn)
    if kind == "gn":
        gn = nn.GroupNorm(min(32, bn.num_features), bn.num_features, eps=bn.eps)
        with torch.no_grad():  # keep the (possibly pretrained) affine parameters
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        return gn
    raise ValueError(f"backbone norm must be 'bn' or 'gn', got {kind!r}")


def _replace_norms(module: nn.Module, kind: str, dual: bool) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = DualNorm(_make_norm(child, kind), _make_norm(child, kind)) if dual else _make_norm(child, kind)
            setattr(module, name, norm)
        else:
            _replace_norms(child, kind, dual)


class RGBXBackbone(nn.Module):
    """Two-branch torchvision ResNet. ``forward(rgb, aux=None)`` returns a list over ``stages`` of
    (rgb_feat, aux_feat) pairs (aux_feat is None in RGB-only mode, aux_ch == 0).

    name: resnet18 | resnet34 | resnet50 | wide_resnet50_2. pretrained: torchvision ImageNet weights
    (cache first). weights_path: a local torchvision-format state dict (loaded into both branches).
    norm: "bn" | "gn" per modality. freeze: no gradients for the backbone and norms kept in eval mode.
    freeze_bn: norms kept in eval mode (running statistics and affine parameters frozen).
    """

    def __init__(self, name: str = "resnet18", aux_ch: int = 3, pretrained: bool = False,
                 weights_path: Optional[str] = None, norm: str = "bn", freeze: bool = False,
                 freeze_bn: bool = False, stages: Tuple[int, ...] = (3, 4, 5)):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        if aux_ch < 0:
            raise ValueError(f"aux_ch must be >= 0, got {aux_ch}")
        if not set(stages) <= set(STAGE_STRIDES):
            raise ValueError(f"stages must be a subset of {sorted(STAGE_STRIDES)}, got {stages}")
        self.name, self.aux_ch, self.stages = name, aux_ch, tuple(sorted(stages))
        net = getattr(_torchvision().models, name)(weights=None)
        state = None
        if weights_path:
            if not os.path.isfile(weights_path):
                raise FileNotFoundError(f"backbone weights file not found: {weights_path}")
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and not any(k.startswith("conv1") for k in state):
                state = state["state_dict"]
        elif pretrained:
            state = _load_pretrained(name)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise RuntimeError(f"backbone weights do not match torchvision's {name}: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]} (from {weights_path or 'torchvision'})")
        self.conv1 = net.conv1
        if aux_ch > 0:
            self.aux_conv1 = nn.Conv2d(aux_ch, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                w = net.conv1.weight
                if aux_ch == 3:
                    self.aux_conv1.weight.copy_(w)
                else:
                    self.aux_conv1.weight.copy_(w.mean(1, keepdim=True).repeat(1, aux_ch, 1, 1) * (3.0 / aux_ch))
        body = nn.ModuleDict(dict(bn1=net.bn1, layer1=net.layer1, layer2=net.layer2, layer3=net.layer3,
                                  layer4=net.layer4))
        _replace_norms(body, norm, dual=aux_ch > 0)
        self.bn1, self.relu, self.maxpool = body["bn1"], nn.ReLU(inplace=True), net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (body["layer1"], body["layer2"], body["layer3"],
                                                              body["layer4"])
        channels = BACKBONES[name]
        self.out_channels = {s: channels[s - 2] for s in self.stages}
        self.strides = {s: STAGE_STRIDES[s] for s in self.stages}
        self.freeze, self.freeze_bn = freeze, freeze_bn
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and (self.freeze or self.freeze_bn):
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None
                ) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """rgb: (B, 3, H, W); aux: (B, aux_ch, H, W) or None -> [(rgb_s, aux_s) for s in stages]."""
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"rgb must be (B, 3, H, W), got {tuple(rgb.shape)}")
        dual = self.aux_ch > 0
        if dual:
            if aux is None or aux.shape[1] != self.aux_ch or aux.shape[0] != rgb.shape[0] \
                    or aux.shape[2:] != rgb.shape[2:]:
                got = None if aux is None else tuple(aux.shape)
                raise ValueError(f"aux must be (B, {self.aux_ch}, H, W) matching rgb {tuple(rgb.shape)}, got {got}")
            x = torch.cat([self.conv1(rgb), self.aux_conv1(aux)], dim=0)   # (2B, 64, H/2, W/2)
        else:
            if aux is not None:
                raise ValueError("this backbone was built RGB-only (aux_ch=0) but an aux tensor was passed")
            x = self.conv1(rgb)
        x = self.maxpool(self.relu(self.bn1(x)))
        feats = {}
        for stage, layer in ((2, self.layer1), (3, self.layer2), (4, self.layer3), (5, self.layer4)):
            x = layer(x)
            feats[stage] = x
            if stage >= self.stages[-1]:
                break
        out = []
        for s in self.stages:
            f = feats[s]
            out.append(f.chunk(2, dim=0) if dual else (f, None))
        return [tuple(p) for p in out]
