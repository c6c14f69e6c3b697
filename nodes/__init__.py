"""sdflow: the pure parts (no Prefect beyond thin task wrappers): run parameters, the Stable Diffusion pipeline, the dataset format, the shapes domain."""
