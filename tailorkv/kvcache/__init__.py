"""The two-tier KV memory (page accounting and storage) and the KV policies."""
