"""KV memory without attention: page pools of both tiers, the prefix cache, GPU copies of host pages, pinned memory."""
