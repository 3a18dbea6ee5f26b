"""All networks of FFF-VDI as one bundle: load it, build it with random weights, save it.

Training, inference and benchmarks get their networks from here only:

- `load_components(source)`: a pipeline folder in our layout (tools/make_tiny_pipeline.py, an
  exported run) or a Hugging Face repo such as SVD-XT-1.1 (then RAFT and flow completion come from
  `raft=` / `flow_completion=` paths).
- `build_random_components("svd_xt" | "tiny" | folder)`: the same networks from bundled configs with
  random weights (or on the meta device), no download.
- `build_components(model_config)`: one of the two, as the configuration (`experiment.model`) says.
- `save_pipeline(components, out_dir)`: our layout, written into a temporary folder and renamed.

Pipeline layout: model_index.json, unet/ (config.json, diffusion_pytorch_model.safetensors),
vae/, image_encoder/, feature_extractor/, scheduler/ (diffusers / transformers layouts),
raft/raft-things.pth (the original RAFT layout), flow_completion/recurrent_flow_completion.pth.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKLTemporalDecoder
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from fff_vdi import __version__
from fff_vdi.config import ModelConfig
from fff_vdi.errors import ConfigError, WeightsError
from fff_vdi.models.flow_completion import FLOW_COMPLETION_FILE, FlowCompletionNet, load_flow_completion
from fff_vdi.models.loading import (
    FLOW_COMPLETION_URL,
    RAFT_URL,
    WeightsRoot,
    check_safetensors,
    describe_key_mismatch,
    is_half,
    key_mismatch,
    weight_file_candidates,
)
from fff_vdi.models.raft import RAFT_FILE_NAMES, RAFTFlow, load_raft, to_original_layout
from fff_vdi.models.unet import FFFVDIUNet
from fff_vdi.utils.atomic import PIPELINE_WRITER, atomic_folder, atomic_write_json

BUNDLED_CONFIGS = Path(__file__).parent / "configs"


@dataclass
class Components:
    unet: FFFVDIUNet
    vae: AutoencoderKLTemporalDecoder
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: CLIPImageProcessor
    scheduler: Any  # a diffusers scheduler (SVD's EulerDiscreteScheduler)
    raft: RAFTFlow
    flow_completion: FlowCompletionNet


# ----------------------------------------------------------------------------------------------
# loading


def load_components(
    source: str,
    *,
    revision: str | None = None,
    unet: str | None = None,
    raft: str | None = None,
    flow_completion: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Components:
    """Load every network from a pipeline folder or a Hub repo (SVD-XT-1.1's layout plus ours).

    `unet` overrides the UNet (a unet folder, or a pipeline folder / repo holding unet/); an SVD
    UNet gets a freshly initialised noise refiner. `raft` / `flow_completion` are weight files
    (or folders holding them); by default they come from the source's raft/ and flow_completion/.
    All networks are put in eval mode, in `torch_dtype` (default float32) on `device`.
    """
    root = WeightsRoot(source, revision)
    dtype = torch_dtype or torch.float32
    # The small networks first: for a Hub source (SVD) their paths are the likeliest to be missing.
    raft_model = load_raft(raft or root.find("raft", RAFT_FILE_NAMES, "RAFT weights", f"Pass raft=PATH to raft-things.pth ({RAFT_URL})."))
    flow_completion_model = load_flow_completion(
        flow_completion
        or root.find("flow_completion", [FLOW_COMPLETION_FILE], "flow completion weights", f"Pass flow_completion=PATH ({FLOW_COMPLETION_URL}).")
    )
    components = Components(
        unet=_load_unet(root, unet, dtype),
        vae=_load_vae(root, dtype),
        image_encoder=_load_image_encoder(root, dtype),
        feature_extractor=_load_feature_extractor(root),
        scheduler=_load_scheduler(root),
        raft=raft_model,
        flow_completion=flow_completion_model,
    )
    return _placed(components, dtype, device)


def _load_unet(root: WeightsRoot, override: str | None, dtype: torch.dtype) -> FFFVDIUNet:
    if override is None:
        return FFFVDIUNet.from_pretrained(root.source, subfolder="unet", revision=root.revision, torch_dtype=dtype)
    if (Path(override) / "config.json").is_file():
        return FFFVDIUNet.from_pretrained(override, torch_dtype=dtype)
    return FFFVDIUNet.from_pretrained(override, subfolder="unet", torch_dtype=dtype)


def _weights_file(root: WeightsRoot, subfolder: str, stem: str, what: str, dtype: torch.dtype) -> tuple[Path, str | None]:
    """The config's folder and the variant ("fp16" or None) of the weights to load, checked to be complete."""
    root.find(subfolder, ["config.json"], f"{what} config")
    path = root.find(subfolder, weight_file_candidates(stem, is_half(dtype)), f"{what} weights")
    check_safetensors(path, f"{what} weights")
    return path.parent, ("fp16" if path.name.endswith(".fp16.safetensors") else None)


def _load_vae(root: WeightsRoot, dtype: torch.dtype) -> AutoencoderKLTemporalDecoder:
    folder, variant = _weights_file(root, "vae", "diffusion_pytorch_model", "VAE", dtype)
    try:
        return AutoencoderKLTemporalDecoder.from_pretrained(str(folder), variant=variant, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"VAE in {folder} could not be loaded: {e}") from e


def _load_image_encoder(root: WeightsRoot, dtype: torch.dtype) -> CLIPVisionModelWithProjection:
    folder, variant = _weights_file(root, "image_encoder", "model", "image encoder", dtype)
    try:
        return CLIPVisionModelWithProjection.from_pretrained(str(folder), variant=variant, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"image encoder in {folder} could not be loaded: {e}") from e


def _load_feature_extractor(root: WeightsRoot) -> CLIPImageProcessor:
    path = root.find("feature_extractor", ["preprocessor_config.json"], "CLIP feature extractor config")
    return CLIPImageProcessor.from_pretrained(str(path.parent))


def _load_scheduler(root: WeightsRoot):
    path = root.find("scheduler", ["scheduler_config.json"], "scheduler config")
    return _scheduler_from_config(_read_json(path), path)


def _scheduler_from_config(config: dict, where: Path):
    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise WeightsError(f"{where}: _class_name {config.get('_class_name')!r} is not a diffusers scheduler")
    return scheduler_class.from_config(config)


def _placed(components: Components, dtype: torch.dtype, device: torch.device | str | None) -> Components:
    for name in ("unet", "vae", "image_encoder", "raft", "flow_completion"):
        # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast (about float32-only modules these models do not have).
        torch.nn.Module.to(getattr(components, name), device=device, dtype=dtype).eval()
    return components


# ----------------------------------------------------------------------------------------------
# random weights


def resolve_config_dir(config_dir_or_name: str) -> Path:
    """A folder of configs in the pipeline layout, or the name of a bundled one ("svd_xt", "tiny")."""
    if Path(config_dir_or_name).is_dir():
        return Path(config_dir_or_name)
    if (BUNDLED_CONFIGS / config_dir_or_name).is_dir():
        return BUNDLED_CONFIGS / config_dir_or_name
    bundled = sorted(p.name for p in BUNDLED_CONFIGS.iterdir() if p.is_dir())
    raise ConfigError(
        "model.random_init", config_dir_or_name, f"use a bundled config ({', '.join(bundled)}) or a folder with unet/, vae/, image_encoder/, feature_extractor/ and scheduler/ configs"
    )


def build_random_components(
    config_dir_or_name: str = "svd_xt",
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    torch_dtype: torch.dtype | None = None,
    meta: bool = False,
) -> Components:
    """Every network from configs, with random weights drawn from `seed` (or on the meta device).

    The weights are initialised directly on `device` (fast for the full-size model on a GPU); the
    global RNG state is left as it was. The noise refiner gets its published initialisation.
    """
    config_dir = resolve_config_dir(config_dir_or_name)
    target = torch.device("meta") if meta else torch.device(device or "cpu")
    rng_devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), target:
        torch.manual_seed(seed)
        unet = FFFVDIUNet.from_config(_read_json(config_dir / "unet" / "config.json"))
        vae = AutoencoderKLTemporalDecoder.from_config(_read_json(config_dir / "vae" / "config.json"))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(str(config_dir / "image_encoder")))
        raft = RAFTFlow()
        flow_completion = FlowCompletionNet()
    scheduler_config = config_dir / "scheduler" / "scheduler_config.json"
    components = Components(
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        feature_extractor=CLIPImageProcessor.from_pretrained(str(config_dir / "feature_extractor")),
        scheduler=_scheduler_from_config(_read_json(scheduler_config), scheduler_config),
        raft=raft,
        flow_completion=flow_completion,
    )
    # Building under the device context misses tensors made by legacy constructors (diffusers'
    # AlphaBlender uses torch.Tensor([alpha])): move everything explicitly.
    return _placed(components, torch_dtype or torch.float32, target)


def build_components(model: ModelConfig, seed: int, device: torch.device | str | None = None) -> Components:
    """The networks `experiment.model` names: from the pretrained source (on the CPU), or random from
    bundled configs drawn from `seed` on `device` (initialising 2.5B parameters on a GPU takes seconds,
    on the CPU minutes; CPU and GPU draw different numbers from one seed)."""
    if model.random_init:
        return build_random_components(model.random_init, seed=seed, device=device)
    return load_components(model.pretrained, revision=model.revision, unet=model.unet, raft=model.raft,
                           flow_completion=model.flow_completion)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"config {path} cannot be read: {e}") from e


# ----------------------------------------------------------------------------------------------
# saving


def pipeline_index(components: Components) -> dict:
    """Our model_index.json: what each folder holds (diffusers' format, plus raft and flow_completion)."""
    return {
        "_class_name": "FFFVDIPipeline",
        "_fff_vdi_version": __version__,
        "unet": ["fff_vdi.models", "FFFVDIUNet"],
        "vae": ["diffusers", type(components.vae).__name__],
        "image_encoder": ["transformers", type(components.image_encoder).__name__],
        "feature_extractor": ["transformers", type(components.feature_extractor).__name__],
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "raft": ["fff_vdi.models", "RAFTFlow", "raft-things.pth layout"],
        "flow_completion": ["fff_vdi.models", "FlowCompletionNet", "ProPainter recurrent_flow_completion.pth layout"],
    }


def save_pipeline(components: Components, out_dir: str | os.PathLike, unet_state_dict: dict[str, torch.Tensor] | None = None,
                  overwrite: bool = False) -> Path:
    """Write the pipeline layout to `out_dir`, atomically: into `OUT.tmp-xxxx`, then renamed.

    `unet_state_dict` replaces the UNet's own tensors (e.g. a full state dict gathered from FSDP
    shards by the trainer); its keys and shapes must be the UNet's. `out_dir` must be absent or
    empty; with `overwrite` it may also be a pipeline folder written here before, holding nothing
    else (utils.atomic.check_output_folder): anything else is refused, never deleted.
    """
    out = Path(out_dir)
    with atomic_folder(out, PIPELINE_WRITER, overwrite) as tmp:
        _write_unet(components.unet, tmp / "unet", unet_state_dict)
        components.vae.save_pretrained(str(tmp / "vae"))
        components.image_encoder.save_pretrained(str(tmp / "image_encoder"))
        components.feature_extractor.save_pretrained(str(tmp / "feature_extractor"))
        components.scheduler.save_pretrained(str(tmp / "scheduler"))
        (tmp / "raft").mkdir()
        torch.save(_cpu(to_original_layout(components.raft.raft.state_dict())), tmp / "raft" / RAFT_FILE_NAMES[0])
        (tmp / "flow_completion").mkdir()
        torch.save(_cpu(components.flow_completion.state_dict()), tmp / "flow_completion" / FLOW_COMPLETION_FILE)
        atomic_write_json(tmp / "model_index.json", pipeline_index(components))
    return out


def _write_unet(unet: FFFVDIUNet, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    expected = unet.state_dict()
    if state_dict is None:
        state_dict = expected
    else:
        missing, unexpected, mismatched = key_mismatch(expected, state_dict)
        if missing or unexpected or mismatched:
            raise WeightsError(describe_key_mismatch("the UNet state dict to export", str(folder), missing, unexpected, mismatched))
    unet.save_config(str(folder))
    save_file(_cpu(state_dict), str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def _cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
