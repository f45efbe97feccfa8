"""OpenAI-compatible chat client: bounded concurrency, retries, on-disk cache, usage accounting."""

from caspo_jax.llm.client import ChatClient, ChatRequest, ChatResult, ClientConfig, ClientStats, Usage
from caspo_jax.llm.messages import assistant_message, image_data_url, system_message, user_message

__all__ = [
    "ChatClient",
    "ChatRequest",
    "ChatResult",
    "ClientConfig",
    "ClientStats",
    "Usage",
    "assistant_message",
    "image_data_url",
    "system_message",
    "user_message",
]
