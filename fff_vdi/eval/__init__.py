"""Video inpainting metrics (PSNR, SSIM, E_warp, VFID) as in the E2FGVI / ProPainter protocol.

    metrics.py   the metrics on uint8 (T, H, W, 3) videos, and the I3D network for VFID
The command line is `python -m fff_vdi.evaluate` (fff_vdi/evaluate.py).
"""

from fff_vdi.eval.metrics import (
    EWARP_SCALE,
    MAX_PSNR,
    I3DFeatures,
    frechet_distance,
    hole_ssim_per_frame,
    i3d_feature,
    load_i3d,
    masked_psnr_per_frame,
    psnr_per_frame,
    ssim_per_frame,
    warping_error_per_pair,
    warping_error_per_pair_dis,
)

__all__ = [
    "EWARP_SCALE",
    "MAX_PSNR",
    "I3DFeatures",
    "frechet_distance",
    "hole_ssim_per_frame",
    "i3d_feature",
    "load_i3d",
    "masked_psnr_per_frame",
    "psnr_per_frame",
    "ssim_per_frame",
    "warping_error_per_pair",
    "warping_error_per_pair_dis",
]
