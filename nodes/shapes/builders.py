"""Small Stable Diffusion models built from configs, saved in diffusers format: nothing is downloaded.

The one builder of tiny models: the tests' models, the bundled `sdflow:tiny-random` and the shapes model that
`flows.train` trains all come from the component builders here.

The same classes and on-disk layout as a real checkpoint (CLIP tokenizer and text encoder, U-Net, VAE,
scheduler, `model_index.json`, safetensors), so loading them exercises exactly the code that loads
`stable-diffusion-v1-5`. Used by the tests, the benchmarks, the bundled models and their training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Words the toy tokenizer knows as whole tokens; anything else falls back to byte-level pieces,
# so every string (Unicode, emoji) still tokenizes.
TOY_WORDS = (
    "a an the of on in at with and photo picture drawing image small large big tiny "
    "red green blue yellow orange purple pink white black gray brown cyan magenta "
    "circle square triangle star cat dog house tree car boat left right top bottom centre center "
    "middle background plain"
).split()


# The scaled-linear schedule and settings of stable-diffusion-v1-5's scheduler_config.json.
SD_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of a toy Stable Diffusion; defaults give a ~3 MB model that makes 64x64 images."""

    sample_size: int = 32  # U-Net latent side; image side = sample_size * 2 ** (len(vae_channels) - 1)
    unet_channels: tuple[int, ...] = (32, 64)  # U-Net block widths; one down/up block each
    layers_per_block: int = 1  # resnet layers in each U-Net block
    vae_channels: tuple[int, ...] = (32, 64)  # VAE block widths; len - 1 halvings of the image side
    text_width: int = 32  # CLIP hidden size, also the U-Net's cross-attention width
    text_layers: int = 2  # CLIP transformer layers
    attention_head_dim: int = 8  # U-Net attention head size
    scheduler: str = "PNDMScheduler"  # the model's own scheduler, as stable-diffusion-v1-5 ships
    seed: int = 0  # initial weights come from torch.manual_seed(seed)


def toy_tokenizer_files(words: tuple[str, ...] | list[str] = TOY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list: all 256 byte symbols (alone and word-final) plus `words`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in symbols + [s + "</w>" for s in symbols]:
        vocab[piece] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word)
        pieces[-1] += "</w>"
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def norm_groups(channels: tuple[int, ...]) -> int:
    """GroupNorm groups for these block widths: the most, up to SD's 32, that divide every width."""
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))


def clip_text_config(vocab_size: int, tokenizer, width: int, layers: int, heads: int):
    """A CLIP text tower's config over `tokenizer`'s special tokens, with CLIP's 77-token context."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_unet(
    channels: tuple[int, ...],
    layers_per_block: int,
    cross_attention: tuple[bool, ...],
    attention_head_dim: int,
    sample_size: int,
    cross_attention_dim: int,
):
    """A `UNet2DConditionModel` with random weights (seed them first): `cross_attention[i]` puts text attention in
    down block i (highest resolution first) and its mirror up block; the mid block always has it."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if attend else "DownBlock2D" for attend in cross_attention)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=tuple(block.replace("Down", "Up") for block in reversed(down)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_groups(channels),
    )


def build_vae(channels: tuple[int, ...], layers_per_block: int, latent_channels: int, sample_size: int):
    """An `AutoencoderKL` with random weights (seed them first) for RGB images of `sample_size` pixels."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups(channels),
        sample_size=sample_size,
    )


def assemble_pipeline(tokenizer, text_encoder, unet, vae, scheduler):
    """The components as a `StableDiffusionPipeline` without safety checker, ready for `save_pretrained`."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_toy_pipeline(config: ToyModelConfig = ToyModelConfig(), words=TOY_WORDS):
    """A `StableDiffusionPipeline` with random weights seeded by `config.seed`, on CPU in float32."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab, merges = toy_tokenizer_files(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(config.seed)
    heads = max(1, config.text_width // 16)
    text_encoder = CLIPTextModel(clip_text_config(len(vocab), tokenizer, config.text_width, config.text_layers, heads))
    n = len(config.unet_channels)
    # Attention only below full resolution (unlike SD): 4x fewer tokens keeps CPU runs quick.
    unet = build_unet(
        config.unet_channels, config.layers_per_block, (False,) + (True,) * (n - 1), config.attention_head_dim,
        config.sample_size, config.text_width,
    )
    vae = build_vae(config.vae_channels, 1, 4, config.sample_size * 2 ** (len(config.vae_channels) - 1))
    scheduler = getattr(diffusers, config.scheduler).from_config(SD_SCHEDULER_CONFIG)
    return assemble_pipeline(tokenizer, text_encoder, unet, vae, scheduler)


def save_toy_model(
    path: str | Path,
    config: ToyModelConfig = ToyModelConfig(),
    defaults: dict | None = None,
) -> Path:
    """Build a toy model and save it in diffusers format (safetensors) to `path`; returns the path.

    `defaults` (e.g. `{"steps": 20, "guidance_scale": 7.5}`) is written to `sdflow.json`, where
    sdflow reads a model's own generation defaults.
    """
    path = Path(path)
    pipe = build_toy_pipeline(config)
    pipe.save_pretrained(path, safe_serialization=True)
    if defaults:
        (path / "sdflow.json").write_text(json.dumps(defaults, indent=2) + "\n")
    return path


if __name__ == "__main__":  # python -m nodes.shapes.builders OUT_DIR: rebuild the bundled tiny random model
    import sys

    save_toy_model(sys.argv[1], defaults={"steps": 20, "guidance_scale": 7.5})
