"""One command-line endpoint spec -> the fields of a ``ClientConfig`` and its prices.

``caspo eval --judge``, ``caspo curate --model/--judge`` and ``caspo sweep``'s judges all
name an OpenAI-compatible endpoint the same way::

    name=N,model=M,base_url=U[,api_key_env=E,price_in=P,price_out=Q]

It lives here, beside the client it configures, so every command reads it without
importing another command's module.
"""

from __future__ import annotations

from typing import Any

ENDPOINT_KEYS = ("name", "model", "base_url", "api_key_env", "price_in", "price_out")


def parse_endpoint_spec(spec: str) -> dict[str, Any]:
    """``name=..,model=..,base_url=..[,api_key_env=..,price_in=..,price_out=..]`` -> dict.

    Defaults: ``api_key_env`` OPENAI_API_KEY, prices 0.0 (per 1k tokens), ``name`` the
    model. A part that is not key=value, an unknown key or a missing model/base_url is a
    ValueError naming the spec and the keys."""
    out: dict[str, Any] = {"api_key_env": "OPENAI_API_KEY", "price_in": 0.0, "price_out": 0.0}
    for part in spec.split(","):
        if "=" not in part:
            raise ValueError(f"--judge {spec!r}: {part!r} is not key=value; keys: {', '.join(ENDPOINT_KEYS)}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in ENDPOINT_KEYS:
            raise ValueError(f"--judge {spec!r}: unknown key {k!r}; keys: {', '.join(ENDPOINT_KEYS)}")
        out[k] = float(v) if k.startswith("price") else v
    missing = [k for k in ("model", "base_url") if not out.get(k)]
    if missing:
        raise ValueError(f"--judge {spec!r}: missing {', '.join(missing)}")
    out.setdefault("name", out["model"])
    return out
