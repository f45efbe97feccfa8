"""OpenAI-compatible chat client: bounded concurrency, retries, on-disk cache, usage accounting."""
