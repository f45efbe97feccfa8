"""Test and demo support shipped with the package: tiny models, a local OpenAI-compatible stub."""
