"""Server settings, in a module with no heavy imports so `lamina --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """Limits and identity of one server; every bound a client could push on is here."""

    served_model_name: str = "lamina"
    api_key: str | None = None
    max_body_bytes: int = 16 << 20
    max_prompt_tokens: int | None = None  # None: what the context holds (max_model_len - 1)
    max_n: int = 16  # bounds n and best_of
    max_prompts_per_request: int = 256
    max_pending_requests: int = 1024
    shutdown_grace: float = 5.0  # seconds running streams get to finish on SIGINT/SIGTERM
