"""The on-disk dataset: prompt-table ingestion, PNG and Parquet storage, the commit protocol, the manifest, contact sheets."""
