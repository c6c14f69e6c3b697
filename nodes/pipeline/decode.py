"""VAE decode: latents to uint8 RGB images, with a float32 second chance for half-precision overflow."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from nodes.pipeline.components import Components

log = logging.getLogger("sdflow")
_float32_vaes: dict[int, torch.nn.Module] = {}
_lock = threading.Lock()


@dataclass
class Decoded:
    """A batch's images (B, H, W, 3) uint8 on the CPU, and which of them are unusable."""

    images: torch.Tensor
    non_finite: list[int]  # batch indices still non-finite after the float32 decode


def float32_vae(components: Components) -> torch.nn.Module:
    """A float32 copy of a half-precision VAE, made once per model on first need."""
    with _lock:
        key = id(components.vae)
        if key not in _float32_vaes:
            _float32_vaes[key] = copy.deepcopy(components.vae).to(torch.float32)
        return _float32_vaes[key]


def _decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].float()


@torch.inference_mode()
def decode_latents(components: Components, latents: torch.Tensor) -> Decoded:
    """Decode latents (B, C, h, w) to uint8 images, as diffusers' image processor converts them.

    Images with non-finite values (the known float16 overflow of the SD VAE) are decoded again in float32;
    those still non-finite are reported, not returned as black images.
    """
    vae = components.vae
    if components.family.upcast_vae and vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae, latents = float32_vae(components), latents.float()  # diffusers' rule: this VAE decodes in float32
    images = _decode(vae, latents)
    bad = (~torch.isfinite(images)).flatten(1).any(1)
    if bad.any() and vae.dtype != torch.float32:
        rows = bad.nonzero().flatten()
        log.warning("%d image(s) overflowed in %s; decoding them again in float32", len(rows), components.vae.dtype)
        images[rows] = _decode(float32_vae(components), latents[rows].float())
        bad = (~torch.isfinite(images)).flatten(1).any(1)
    images = (images.nan_to_num(0) / 2 + 0.5).clamp(0, 1)
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return Decoded(pixels, bad.nonzero().flatten().tolist())


decode_latents_task = task(decode_latents, name="decode-latents", cache_policy=NO_CACHE, persist_result=False)
