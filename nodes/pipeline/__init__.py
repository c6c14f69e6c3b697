"""The Stable Diffusion stages (tensors in, tensors out, each with its thin Prefect task beside it), model families and loading, and the batch engine."""
