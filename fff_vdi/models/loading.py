"""Find and read weight files, locally or on the Hugging Face Hub, with errors that say how to fix them.

A weights root is either a local folder in the pipeline layout (`unet/`, `vae/`, ...) or a Hub repo
id such as Stable Video Diffusion's. Files on the Hub are fetched one by one through
`huggingface_hub.hf_hub_download` (so only what is needed is downloaded, and the cache and
HF_HUB_OFFLINE=1 work as usual). Every failure becomes a `WeightsError` that names what is missing
and how to obtain it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors_file

from fff_vdi.errors import WeightsError
from fff_vdi.utils.paths import is_hub_repo_id, looked_for_at

RAFT_URL = "https://github.com/sczhou/ProPainter/releases/download/v0.1.0/raft-things.pth"
FLOW_COMPLETION_URL = "https://github.com/sczhou/ProPainter/releases/download/v0.1.0/recurrent_flow_completion.pth"
# What a pipeline needs from a Hub repo such as SVD's (its single-file checkpoints are not needed).
PIPELINE_PATTERNS = "model_index.json 'unet/*' 'vae/*' 'image_encoder/*' 'feature_extractor/*' 'scheduler/*'"


def weight_file_candidates(stem: str, prefer_half: bool) -> list[str]:
    """Diffusers/transformers weight names in the order to try: full precision first unless the
    model will run in 16 bits anyway (SVD-XT-1.1 ships `*.fp16.safetensors`, maybe full ones too)."""
    full, half = f"{stem}.safetensors", f"{stem}.fp16.safetensors"
    return [half, full] if prefer_half else [full, half]


def is_half(dtype: torch.dtype | None) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


class WeightsRoot:
    """A local pipeline folder or a Hugging Face repo (with an optional revision)."""

    def __init__(self, source: str | os.PathLike, revision: str | None = None):
        self.source = str(source)
        self.revision = revision
        path = Path(self.source).expanduser()
        self.local_path: Path | None = path if path.is_dir() else None
        if self.local_path is None and not is_hub_repo_id(self.source):
            what = "is a file, not a folder" if path.exists() else "no such folder"
            raise WeightsError(
                f"weights source '{self.source}': {what}: {looked_for_at(path)}; give a pipeline folder (e.g. one "
                "written by tools/make_tiny_pipeline.py) or a Hugging Face repo id such as "
                "stabilityai/stable-video-diffusion-img2vid-xt-1-1"
            )

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    def __str__(self) -> str:
        if self.is_local:
            return str(self.local_path)
        return self.source + (f"@{self.revision}" if self.revision else "")

    def find(self, subfolder: str | None, candidates: Sequence[str], what: str, how_to_get: str = "") -> Path:
        """The local path of the first candidate file that exists (downloading it from the Hub if needed)."""
        if self.is_local:
            folder = self.local_path / subfolder if subfolder else self.local_path
            for name in candidates:
                if (folder / name).is_file():
                    return folder / name
            raise WeightsError(
                f"{what} not found: none of {', '.join(candidates)} in {folder}. "
                + (how_to_get or "Check the folder's layout (unet/, vae/, image_encoder/, feature_extractor/, scheduler/, raft/, flow_completion/).")
            )
        return self._download_first(subfolder, candidates, what, how_to_get)

    def _download_first(self, subfolder: str | None, candidates: Sequence[str], what: str, how_to_get: str) -> Path:
        not_cached = []
        for name in candidates:
            try:
                return Path(huggingface_hub.hf_hub_download(self.source, name, subfolder=subfolder, revision=self.revision))
            except GatedRepoError as e:
                raise WeightsError(gated_message(self.source)) from e
            except RevisionNotFoundError as e:
                raise WeightsError(f"revision '{self.revision}' of {self.source} does not exist: check `revision`") from e
            except RepositoryNotFoundError as e:
                raise WeightsError(
                    f"'{self.source}' is not a local folder ({looked_for_at(self.source)}), and no Hugging Face repo of that name is visible to you: "
                    "check the spelling, or log in (`export HF_TOKEN=...` or `hf auth login` / `huggingface-cli login`) if it is private"
                ) from e
            except LocalEntryNotFoundError:
                not_cached.append(name)  # offline or unreachable, and not in the cache: try the other names
            except EntryNotFoundError:
                continue  # the repo has no file of this name: try the next one
            except (HfHubHTTPError, OSError) as e:
                raise WeightsError(f"{what}: downloading {self._hub_path(subfolder, name)} failed: {e}") from e
        names = ", ".join(self._hub_path(subfolder, n) for n in candidates)
        if not_cached:
            raise WeightsError(offline_message(self.source, names) + (f". If the repo has no such file: {how_to_get}" if how_to_get else ""))
        raise WeightsError(f"{what} not found: the repo {self} has none of {names}. {how_to_get}".rstrip())

    @staticmethod
    def _hub_path(subfolder: str | None, name: str) -> str:
        return f"{subfolder}/{name}" if subfolder else name


def gated_message(repo_id: str) -> str:
    return (
        f"{repo_id} is a gated model and this machine has no access to it: accept its licence at "
        f"https://huggingface.co/{repo_id} while logged in, then give this machine a token with read access: "
        "`export HF_TOKEN=hf_...` (from https://huggingface.co/settings/tokens) or `huggingface-cli login` "
        "(`hf auth login` in recent huggingface_hub)"
    )


def offline_message(repo_id: str, names: str) -> str:
    why = "HF_HUB_OFFLINE=1 is set" if hub_constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
    return (
        f"'{repo_id}' is not a local folder ({looked_for_at(repo_id)}), and none of {names} from the Hugging Face repo is in the local cache "
        f"({hub_constants.HF_HUB_CACHE}) while {why}. "
        f"Pre-download it on a machine with internet: `huggingface-cli download {repo_id} --include {PIPELINE_PATTERNS}` "
        f"(or `hf download ...`; gated repos need a token: accept the licence at https://huggingface.co/{repo_id}, "
        "then `export HF_TOKEN=...`), copy the cache here (or point HF_HOME / HF_HUB_CACHE at it) and set HF_HUB_OFFLINE=1"
    )


def check_safetensors(path: Path, what: str) -> None:
    """Raise WeightsError if `path` is not a complete safetensors file (e.g. an interrupted download)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise WeightsError(corrupt_message(path, what, e)) from e


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    check_safetensors(path, what)
    try:
        return load_safetensors_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(corrupt_message(path, what, e)) from e


def read_torch_state_dict(path: Path, what: str, url: str) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, bare or under a `state_dict` key, loaded safely (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} not found at {path}: download it from {url}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load reports truncation and corruption with many exception types
        raise WeightsError(corrupt_message(path, what, e) + f" (original: {url})") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{what}: {path} does not hold a state dict of tensors (bare or under 'state_dict'); expected the file from {url}")
    return obj


def corrupt_message(path: Path, what: str, error: Exception) -> str:
    detail = (str(error).splitlines() or [""])[0][:160]
    return f"{what}: {path} cannot be read ({type(error).__name__}: {detail}); it is probably truncated or corrupt: delete it and download it again"


def describe_key_mismatch(what: str, where: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str] = ()) -> str:
    """A readable report of a state dict that does not fit its model (first 20 names of each kind)."""

    def listing(label: str, names: Sequence[str]) -> str:
        names = sorted(names)
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        return f"\n  {label} ({len(names)}): {shown}"

    parts = [f"{what} at {where} does not match the model's layout:"]
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if names:
            parts.append(listing(label, names))
    return "".join(parts)


def key_mismatch(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of `state_dict` against a model's `expected` state dict."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def strict_load(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str, where: str) -> None:
    """`load_state_dict(strict=True)` with a WeightsError that lists missing, unexpected and misshapen keys."""
    missing, unexpected, mismatched = key_mismatch(model.state_dict(), state_dict)
    if missing or unexpected or mismatched:
        raise WeightsError(describe_key_mismatch(what, where, missing, unexpected, mismatched))
    model.load_state_dict(state_dict, strict=True)
