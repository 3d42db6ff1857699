"""Configuration shared by every process (``flexkv.common.config``: ModelConfig, CacheConfig, ...)."""
