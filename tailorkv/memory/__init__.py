"""KV memory without attention: page pools of both tiers, prefix cache, GPU copies of host pages."""
