"""sdflow's stages: pure functions on tables and tensors, each with a thin Prefect task beside it."""
