"""The gateway's OpenAI-compatible HTTP API: protocol (request bodies), responses, errors, server (aiohttp)."""
