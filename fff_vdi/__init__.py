"""FFF-VDI: video inpainting by first-frame filling of Stable Video Diffusion.

Library layout (each package has one job):
  data/         shards on disk, clip sampling, masks, DALI and CPU loaders
  models/       FFF-VDI UNet with the noise refiner, RAFT, flow completion, weight loading
  distributed/  process groups and the one `parallelize` step (checkpointing, compile, FSDP2)
  train/        objective, optimizer, checkpointing, metrics, the trainer loop
  inference/    the published sampler and long-video windowing
  eval/         PSNR, SSIM, flow-warping error, VFID
"""

__version__ = "0.1.0"
