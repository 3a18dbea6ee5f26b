"""Loading weights: SVD's UNet without the refiner, strictness, and errors that say how to fix them.

No network: the Hub is replaced by a fake `huggingface_hub.hf_hub_download`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RemoteEntryNotFoundError
from safetensors.torch import load_file, save_file

from fff_vdi.config import SVD_XT_ID
from fff_vdi.errors import WeightsError
from fff_vdi.models import FFFVDIUNet, load_components, load_flow_completion, load_raft
from fff_vdi.models.components import BUNDLED_CONFIGS
from models_fixtures import parity_dir  # noqa: F401  (fixture)

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def http_error(cls, message: str):
    request = httpx.Request("GET", "https://huggingface.co/api/models/x")
    return cls(message, response=httpx.Response(404 if cls is RemoteEntryNotFoundError else 403, request=request))


def copy_pipeline(tiny_pipeline: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_pipeline, tmp_path / "pipeline"))


# ----------------------------------------------------------------------------------------------
# the UNet


def test_svd_unet_loads_with_a_freshly_initialised_refiner(tmp_path, caplog):
    config = json.loads((BUNDLED_CONFIGS / "tiny" / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    svd_unet = UNetSpatioTemporalConditionModel.from_config(config)
    svd_unet.save_pretrained(tmp_path / "unet")

    with caplog.at_level(logging.WARNING, logger="fff_vdi.models.unet"):
        unet = FFFVDIUNet.from_pretrained(tmp_path / "unet")

    assert "noise refiner" in caplog.text and "freshly initialised" in caplog.text
    ours = unet.state_dict()
    for name, tensor in svd_unet.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    channels = config["block_out_channels"][0]
    bound = 1 / math.sqrt(channels * 9)
    for direction in ("backward_1", "forward_1"):
        align = unet.noise_refiner.deform_align[direction]
        assert torch.count_nonzero(align.conv_offset[-1].weight) == 0 and torch.count_nonzero(align.conv_offset[-1].bias) == 0
        assert align.weight.abs().max() <= bound and align.weight.abs().max() > bound / 2
        assert torch.count_nonzero(align.bias) == 0
        assert torch.count_nonzero(align.conv_offset[0].weight) > 0  # PyTorch's default conv init
    assert all(p.device.type == "cpu" for p in unet.parameters())


def fff_vdi_unet_copy(parity_dir: Path, tmp_path: Path) -> tuple[Path, dict]:
    folder = Path(shutil.copytree(parity_dir / "fff_vdi_unet_tiny", tmp_path / "unet"))
    (folder / UNET_WEIGHTS).chmod(0o644)
    return folder, load_file(str(folder / UNET_WEIGHTS))


def test_fff_vdi_unet_with_a_missing_refiner_key_is_an_error(parity_dir, tmp_path):
    folder, state = fff_vdi_unet_copy(parity_dir, tmp_path)
    del state["noise_refiner.fuse.2.bias"]
    save_file(state, str(folder / UNET_WEIGHTS))

    with pytest.raises(WeightsError, match=r"missing \(1\): noise_refiner\.fuse\.2\.bias"):
        FFFVDIUNet.from_pretrained(folder)


def test_unet_with_unexpected_or_misshapen_keys_is_an_error(parity_dir, tmp_path):
    folder, state = fff_vdi_unet_copy(parity_dir, tmp_path)
    state["controlnet.extra.weight"] = torch.zeros(3)
    state["conv_in.bias"] = torch.zeros(7)
    save_file(state, str(folder / UNET_WEIGHTS))

    with pytest.raises(WeightsError, match=r"(?s)unexpected \(1\): controlnet\.extra\.weight.*wrong shape \(1\): conv_in\.bias"):
        FFFVDIUNet.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------
# the Hub


def test_gated_repo_says_how_to_get_access(monkeypatch):
    def gated(*args, **kwargs):
        raise http_error(GatedRepoError, "403 gated")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(WeightsError) as error:
        load_components(SVD_XT_ID)
    message = str(error.value)
    assert "https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt-1-1" in message
    assert "HF_TOKEN" in message and "huggingface-cli login" in message


def test_offline_without_cache_says_how_to_pre_download(tiny_pipeline, monkeypatch):
    def not_cached(*args, **kwargs):
        raise LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    with pytest.raises(WeightsError) as error:
        load_components(SVD_XT_ID, raft=str(tiny_pipeline / "raft"), flow_completion=str(tiny_pipeline / "flow_completion"))
    message = str(error.value)
    assert f"huggingface-cli download {SVD_XT_ID}" in message and "HF_HUB_OFFLINE=1" in message
    assert "unet/config.json" in message


def test_svd_repo_without_raft_path_says_where_to_get_raft(monkeypatch):
    def svd_repo(repo_id, filename, *, subfolder=None, **kwargs):
        raise http_error(RemoteEntryNotFoundError, f"404 {subfolder}/{filename}")  # SVD's repo has no raft/

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", svd_repo)
    with pytest.raises(WeightsError, match=r"RAFT weights not found.*Pass raft=PATH.*releases/download/v0\.1\.0/raft-things\.pth"):
        load_components(SVD_XT_ID)


def test_hub_repo_with_fp16_variants_only(tiny_pipeline, tmp_path, monkeypatch):
    """SVD-XT-1.1 ships `*.fp16.safetensors`: the full file is tried first, then the fp16 one."""
    repo = copy_pipeline(tiny_pipeline, tmp_path)
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("image_encoder", "model")):
        full = repo / sub / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(str(full)).items()}, str(repo / sub / f"{stem}.fp16.safetensors"))
        full.unlink()
    requested = []

    def fake_download(repo_id, filename, *, subfolder=None, revision=None, **kwargs):
        requested.append(f"{subfolder}/{filename}")
        path = repo / (subfolder or "") / filename
        if not path.is_file():
            raise http_error(RemoteEntryNotFoundError, f"404 {filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    components = load_components("someone/tiny-svd", raft=str(repo / "raft"), flow_completion=str(repo / "flow_completion"))

    assert requested.index("unet/diffusion_pytorch_model.safetensors") < requested.index("unet/diffusion_pytorch_model.fp16.safetensors")
    assert next(components.unet.parameters()).dtype == torch.float32
    expected = load_file(str(repo / "vae" / "diffusion_pytorch_model.fp16.safetensors"))
    for name, tensor in components.vae.state_dict().items():
        assert torch.equal(tensor, expected[name].float()), name

    requested.clear()
    load_components("someone/tiny-svd", raft=str(repo / "raft"), flow_completion=str(repo / "flow_completion"), torch_dtype=torch.bfloat16)
    assert "unet/diffusion_pytorch_model.safetensors" not in requested  # 16-bit runs take the fp16 file first


# ----------------------------------------------------------------------------------------------
# local files


def test_truncated_safetensors_is_reported_as_corrupt(tiny_pipeline, tmp_path):
    for sub in ("unet", "vae"):
        pipeline = copy_pipeline(tiny_pipeline, tmp_path / sub)
        weights = pipeline / sub / UNET_WEIGHTS
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        with pytest.raises(WeightsError, match=r"truncated or corrupt") as error:
            load_components(str(pipeline))
        assert str(weights) in str(error.value)


def test_missing_files_are_named_with_where_to_get_them(tiny_pipeline, tmp_path, monkeypatch):
    pipeline = copy_pipeline(tiny_pipeline, tmp_path)
    shutil.rmtree(pipeline / "raft")
    with pytest.raises(WeightsError, match=r"RAFT weights not found.*raft-things\.pth"):
        load_components(str(pipeline))
    (pipeline / "vae" / UNET_WEIGHTS).unlink()
    with pytest.raises(WeightsError, match=r"VAE weights not found: none of diffusion_pytorch_model\.safetensors"):
        load_components(str(pipeline), raft=str(tiny_pipeline / "raft"))
    with pytest.raises(WeightsError, match=r"releases/download/v0\.1\.0/raft-things\.pth"):
        load_raft(tmp_path / "nowhere" / "raft-things.pth")
    with pytest.raises(WeightsError, match=r"recurrent_flow_completion\.pth"):
        load_flow_completion(tmp_path / "nowhere.pth")
    with pytest.raises(WeightsError, match=r"no such folder: .*/no/such/folder; give a pipeline folder"):
        load_components(str(tmp_path / "no" / "such" / "folder"))
    # owner/name, but its owner is a folder here: a missing folder, not a Hub repo to download (issue 17.9)
    (tmp_path / "quickstart_out").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError, match=r"no such folder: .*quickstart_out/tiny_pipeline \(relative to the current"):
        load_components("quickstart_out/tiny_pipeline")


def test_corrupt_torch_checkpoints_are_reported(tmp_path):
    garbage = tmp_path / "raft-things.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot be read.*truncated or corrupt"):
        load_raft(garbage)
    torch.save({"fnet.conv1.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"missing \(\d+\)"):
        load_raft(tmp_path / "partial.pth")
    torch.save({"downsample.0.weight": torch.zeros(1)}, tmp_path / "completion.pth")
    with pytest.raises(WeightsError, match=r"(?s)flow completion weights.*does not match.*recurrent_flow_completion\.pth"):
        load_flow_completion(tmp_path / "completion.pth")


def test_raft_loads_torchvision_weight_files(tiny_pipeline, tmp_path):
    raft = load_raft(tiny_pipeline / "raft")
    torch.save(raft.raft.state_dict(), tmp_path / "raft_large_C_T_SKHT_V2.pth")  # torchvision's own layout
    again = load_raft(tmp_path / "raft_large_C_T_SKHT_V2.pth")
    for name, tensor in raft.raft.state_dict().items():
        assert torch.equal(again.raft.state_dict()[name], tensor)
