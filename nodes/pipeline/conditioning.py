"""What a model family adds to the U-Net call beside the prompt embeddings (its `added_cond_kwargs`, say)."""

from __future__ import annotations


def no_added_conditioning(components, rows, embeds, guided: bool) -> dict:
    """Stable Diffusion 1.x/2.x: the U-Net takes the prompt embeddings alone."""
    return {}
