"""Training a small latent diffusion model from scratch on the shapes domain, with Stable Diffusion's recipe at toy scale.

Pure functions, no Prefect: component specs and builders, one training loop per component (CLIP, VAE, U-Net) and
the saving of the result in diffusers format, with the same classes and on-disk layout as a real SD checkpoint.
Examples are drawn on the fly from `nodes.shapes.domain`: step i of a component takes its batch, noise and timesteps from
a seed derived from (run seed, component, i), so a run is reproducible from its seed alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nodes.shapes import domain
from nodes.shapes import builders
from nodes.shapes.builders import SD_SCHEDULER_CONFIG, TOY_WORDS, toy_tokenizer_files

# The U-Net learns to denoise along SD v1.5's scaled-linear schedule, and the saved sampler walks it.
# Stable Diffusion v1's noise schedule and timestep spacing ("leading", what its PNDM config implies), for
# whichever sampler class the model is saved with.
SCHEDULER_CONFIG = {**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading"}
MAX_TOKENS = 77  # CLIP's context, as in SD: the pipeline pads every prompt to it
MIN_LR_FRACTION = 0.1  # cosine decay ends at this fraction of the peak learning rate
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature so logits stay below 100
MAX_GRAD_NORM = 1.0  # gradients are clipped to this norm: one odd batch cannot throw a small model off

StepCallback = Callable[[int, float], None]  # called with (step, loss) after each optimizer step


@dataclass(frozen=True)
class ClipSpec:
    """The CLIP model (a text and a vision tower) and its contrastive training."""

    text_width: int = 64  # text tower hidden size; also the U-Net's cross-attention width
    text_layers: int = 4  # text transformer layers
    vision_width: int = 64  # vision tower hidden size
    vision_layers: int = 4  # vision transformer layers
    patch_size: int = 8  # vision patch side: a 64x64 image is 8x8 = 64 patches
    heads: int = 4  # attention heads, both towers
    projection_dim: int = 64  # the shared embedding space where captions and images are compared
    steps: int = 1500  # optimizer steps
    batch_size: int = 128  # (image, caption) pairs per step; each pair's negatives are the rest of its batch
    learning_rate: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up steps, then cosine decay to MIN_LR_FRACTION of the peak
    weight_decay: float = 0.1  # AdamW, on weight matrices only (not on gains, biases or the logit scale)


@dataclass(frozen=True)
class VaeSpec:
    """The KL autoencoder that maps 64x64 images to 4-channel latents, and its training."""

    channels: tuple[int, ...] = (16, 32, 64)  # block widths; len - 1 halvings of the side: 64x64 -> 16x16 latents
    layers_per_block: int = 1  # resnets per encoder block (each decoder block has one more, as in diffusers)
    latent_channels: int = 4  # as SD
    kl_weight: float = 1e-5  # weight of the KL to N(0, 1) (mean per latent element) beside the MSE (mean per pixel)
    initial_logvar: float = -8.0  # posterior log-variance at init: unit-variance noise would drown the early latents
    steps: int = 3000  # optimizer steps
    batch_size: int = 16  # images per step
    learning_rate: float = 2e-3  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up steps, then cosine decay
    weight_decay: float = 0.0  # AdamW, on weight matrices only
    scale_samples: int = 512  # images whose latents measure the scaling factor (1 / their std, as SD did)


@dataclass(frozen=True)
class UnetSpec:
    """The text-conditioned U-Net that predicts the noise in VAE latents, and its training."""

    channels: tuple[int, ...] = (64, 96, 96)  # block widths; len - 1 halvings of the 16x16 latents
    layers_per_block: int = 1  # resnets per down block (each up block has one more, as in diffusers)
    attention_levels: int = 2  # the first (highest-resolution) blocks with cross-attention; the mid block always has it
    attention_heads: int = 4  # heads per attention layer (diffusers' `attention_head_dim`, which SD v1 uses as a count)
    caption_dropout: float = 0.1  # share of captions replaced by "" so the model also learns the unconditional score
    snr_gamma: float | None = 5.0  # Min-SNR-gamma loss weights min(SNR, gamma) / SNR (Hang et al. 2023); None: plain MSE
    ema_decay: float = 0.999  # EMA of the weights (the EMA is what is saved); ramps up as (1 + step) / (10 + step)
    steps: int = 5000  # optimizer steps
    batch_size: int = 32  # images per step
    learning_rate: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 200  # linear warm-up steps, then cosine decay
    weight_decay: float = 0.01  # AdamW, on weight matrices only


def domain_words() -> tuple[str, ...]:
    """Whole-word tokens of the tokenizer: every caption word of the domain, then the toy words, without repeats."""
    return tuple(dict.fromkeys(domain.DOMAIN_WORDS + tuple(TOY_WORDS)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lowercase ASCII word: its characters (the last marked </w>), lowest-ranked pair first."""
    pieces = list(word)
    pieces[-1] += "</w>"
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == math.inf:
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def whole_word_tokenizer_files(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """`nodes.shapes.builders.toy_tokenizer_files(words)`, plus the merges that make every word one token.

    Its merge chains can break each other: "an" merges before "triangle"'s chain reaches the a, which leaves
    "triangle" as six pieces. Each word still in pieces gets merges of its leftover pieces appended (ranked last,
    so no word already whole changes) until it comes out whole.
    """
    vocab, merges = toy_tokenizer_files(words)
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    for word in words:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            ranks[merge] = len(merges)
            merges.append(merge)
            vocab.setdefault(merge[0] + merge[1], len(vocab))
            pieces = _bpe(word, ranks)
    return vocab, merges


def build_tokenizer():
    """A `CLIPTokenizer` whose vocabulary holds `domain_words()` whole, other text as byte-level pieces."""
    from transformers import CLIPTokenizer

    vocab, merges = whole_word_tokenizer_files(domain_words())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def training_seed(seed: int, component: str, step: int) -> int:
    """A 32-bit seed for one step of one component, from the run seed; the same inputs give the same seed."""
    digest = hashlib.sha256(f"sdflow-train:{seed}:{component}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def step_seed(seed: int, component: str, step: int, distinct_batches: int = 0) -> int:
    """The seed of a training step; with `distinct_batches` N > 0 steps cycle through N seeds (N fixed batches)."""
    return training_seed(seed, component, step % distinct_batches if distinct_batches > 0 else step)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, H, W, 3) -> float32 (n, 3, H, W) in [-1, 1]: the VAE's input, and the CLIP vision tower's."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def example_batch(seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """`n` training-split examples from `nodes.shapes.domain`: pixel values (n, 3, 64, 64) in [-1, 1] and captions."""
    images, captions, _ = domain.make_examples(n, seed, split="train")
    return pixel_values(images), captions


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def megabytes(module: torch.nn.Module) -> float:
    """Size of the module's weights in float32, in MB (10^6 bytes): about its safetensors file."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 1e6


def loss_curve(losses: list[float], every: int) -> list[float]:
    """Mean loss of each run of `every` steps (the last run may be shorter): a loss curve small enough to keep."""
    return [round(float(np.mean(losses[i : i + every])), 5) for i in range(0, len(losses), every)]


def _optimize(
    parameters: list[torch.nn.Parameter],
    spec: ClipSpec | VaeSpec | UnetSpec,
    step_loss: Callable[[int], torch.Tensor],
    on_step: StepCallback | None,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up then cosine decay over `spec.steps`; returns each step's loss.

    Weight decay applies to matrices and kernels only: decaying norm gains, biases or CLIP's temperature toward
    zero would only fight the loss.
    """
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=spec.learning_rate)

    def lr_factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    for step in range(spec.steps):
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def build_clip(spec: ClipSpec, tokenizer):
    """A `CLIPModel` with random weights (seed them first): text tower over the tokenizer, vision tower over 64x64."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text = builders.clip_text_config(len(tokenizer), tokenizer, spec.text_width, spec.text_layers, spec.heads)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=spec.vision_width * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.heads,
        image_size=domain.IMAGE_SIZE,
        patch_size=spec.patch_size,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=spec.projection_dim)
    return CLIPModel(config)


def train_clip(
    spec: ClipSpec, tokenizer, seed: int, distinct_batches: int = 0, on_step: StepCallback | None = None
):
    """Train CLIP contrastively (symmetric InfoNCE, learnable temperature) on (image, caption) pairs of the train split.

    Returns (the CLIPModel in eval mode, each step's loss). Captions are padded to the batch's longest only: the text
    tower is causal and pools at the first end token, so padding further would change nothing but the cost.
    """
    torch.manual_seed(training_seed(seed, "clip", -1))
    clip = build_clip(spec, tokenizer).train()

    def step_loss(step: int) -> torch.Tensor:
        images, captions = example_batch(step_seed(seed, "clip", step, distinct_batches), spec.batch_size)
        tokens = tokenizer(captions, padding="longest", return_tensors="pt")
        return clip(input_ids=tokens.input_ids, pixel_values=images, return_loss=True).loss

    def clamp_temperature(step: int) -> None:
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    losses = _optimize(list(clip.parameters()), spec, step_loss, on_step, clamp_temperature)
    return clip.eval().requires_grad_(False), losses


def clip_text_encoder(clip):
    """The CLIP model's text tower as a `CLIPTextModel` (the pipeline's text encoder), sharing no tensors with it."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval().requires_grad_(False)


def build_vae(spec: VaeSpec):
    """An `AutoencoderKL` with random weights (seed them first) for 64x64 RGB images."""
    return builders.build_vae(spec.channels, spec.layers_per_block, spec.latent_channels, domain.IMAGE_SIZE)


def train_vae(spec: VaeSpec, seed: int, distinct_batches: int = 0, on_step: StepCallback | None = None):
    """Train the VAE: squared error of the reconstruction from a posterior sample plus `kl_weight` x KL to N(0, 1).

    Squared error rather than SD's L1 (+ LPIPS): each image is mostly flat background, and L1's gradient, the same
    for a small error as for a large one, spends the early steps on it; squared error goes for the object first.

    Returns (the AutoencoderKL in eval mode, each step's loss). Its scaling factor is still the default: measure it
    with `measure_scaling_factor`.
    """
    torch.manual_seed(training_seed(seed, "vae", -1))
    vae = build_vae(spec).train()
    with torch.no_grad():  # quant_conv's outputs are the posterior's (mean, log-variance) channels
        vae.quant_conv.bias[spec.latent_channels :] = spec.initial_logvar

    def step_loss(step: int) -> torch.Tensor:
        step_rng = step_seed(seed, "vae", step, distinct_batches)
        images, _ = example_batch(step_rng, spec.batch_size)
        posterior = vae.encode(images).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(step_rng))
        reconstruction = vae.decode(latents).sample
        kl = posterior.kl().mean() / latents[0].numel()
        return F.mse_loss(reconstruction, images) + spec.kl_weight * kl

    losses = _optimize(list(vae.parameters()), spec, step_loss, on_step)
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def measure_scaling_factor(vae, samples: int, seed: int, batch_size: int = 64) -> float:
    """1 / std of the VAE's latents (posterior samples) over `samples` training images, as SD measured its 0.18215."""
    latents = []
    for start in range(0, samples, batch_size):
        step_rng = training_seed(seed, "vae-scale", start)
        images, _ = example_batch(step_rng, min(batch_size, samples - start))
        posterior = vae.encode(images).latent_dist
        latents.append(posterior.sample(generator=torch.Generator().manual_seed(step_rng)))
    return float(1.0 / torch.cat(latents).std())


def build_unet(spec: UnetSpec, sample_size: int, cross_attention_dim: int):
    """A `UNet2DConditionModel` with random weights (seed them first), SD v1's layout at toy widths.

    Cross-attention in the first `attention_levels` down blocks (highest resolutions first), their mirror up blocks
    and the mid block; the lowest-resolution block has none, as in SD.
    """
    attention = tuple(i < spec.attention_levels for i in range(len(spec.channels)))
    return builders.build_unet(
        spec.channels, spec.layers_per_block, attention, spec.attention_heads, sample_size, cross_attention_dim
    )


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Captions -> the text encoder's last hidden state (n, 77, width), padded to 77 as nodes.pipeline.encode does."""
    tokens = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids)[0]


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move each EMA weight `1 - decay` of the way to the model's."""
    with torch.no_grad():
        for averaged, current in zip(ema.parameters(), model.parameters()):
            averaged.lerp_(current, 1.0 - decay)


def train_unet(
    spec: UnetSpec,
    tokenizer,
    text_encoder,
    vae,
    seed: int,
    distinct_batches: int = 0,
    on_step: StepCallback | None = None,
):
    """Train the U-Net for epsilon prediction on VAE latents along SD v1's scaled-linear DDPM schedule.

    Per step: encode the images with the frozen VAE (posterior sample x scaling factor), drop `caption_dropout` of
    the captions to "" (for classifier-free guidance), encode them with the frozen text encoder, noise the latents
    at uniform timesteps, and regress the noise (MSE, Min-SNR weighted unless `snr_gamma` is None).
    Returns (the EMA of the U-Net's weights, in eval mode; each step's loss).
    """
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas_cumprod = noise_schedule.alphas_cumprod
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(training_seed(seed, "unet", -1))
    unet = build_unet(spec, domain.IMAGE_SIZE // vae_factor, text_encoder.config.hidden_size).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    scaling_factor = vae.config.scaling_factor

    def step_loss(step: int) -> torch.Tensor:
        step_rng = step_seed(seed, "unet", step, distinct_batches)
        images, captions = example_batch(step_rng, spec.batch_size)
        generator = torch.Generator().manual_seed(step_rng)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator=generator) * scaling_factor
        dropped = torch.rand(len(captions), generator=generator) < spec.caption_dropout
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), captions)]
        context = encode_captions(tokenizer, text_encoder, captions)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(captions),), generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        if spec.snr_gamma is None:
            return F.mse_loss(prediction, noise)
        # Low-noise timesteps, whose noise is hardest to see and matters least to the image, count less.
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weights = snr.clamp(max=spec.snr_gamma) / snr
        return (weights * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    def average(step: int) -> None:
        update_ema(ema, unet, min(spec.ema_decay, (1 + step) / (10 + step)))

    losses = _optimize(list(unet.parameters()), spec, step_loss, on_step, average)
    return ema, losses


def save_model(
    path: str | Path,
    tokenizer,
    text_encoder,
    vae,
    unet,
    clip,
    scheduler: str = "PNDMScheduler",
    defaults: dict | None = None,
    record: dict | None = None,
) -> Path:
    """Save the trained model in diffusers format (safetensors) at `path`; returns the path.

    Besides the pipeline's folders: `clip/` holds the whole CLIP model with its tokenizer and image processor (for
    CLIP scores; pipelines ignore folders not in model_index.json), `sdflow.json` the generation `defaults`, and
    `train.json` the training `record` (config, loss curves, timings).
    """
    import diffusers
    from transformers import CLIPImageProcessor

    path = Path(path)
    sampler = getattr(diffusers, scheduler).from_config(SCHEDULER_CONFIG)
    pipe = builders.assemble_pipeline(tokenizer, text_encoder, unet, vae, sampler)
    pipe.save_pretrained(path, safe_serialization=True)
    clip.save_pretrained(path / "clip", safe_serialization=True)
    tokenizer.save_pretrained(path / "clip")
    # Images go to the vision tower as `pixel_values` does it: uint8 / 127.5 - 1, no resizing or cropping.
    CLIPImageProcessor(
        do_resize=False, do_center_crop=False, do_convert_rgb=True, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(path / "clip")
    if defaults:
        (path / "sdflow.json").write_text(json.dumps(defaults, indent=2) + "\n")
    if record:
        (path / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return path
