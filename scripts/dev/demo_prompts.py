"""The prompts both `specd demo` stages show: (name, prompt, wrap in the chat template), and the conversation the
services stage ends with through the OpenAI-compatible HTTP API."""
from __future__ import annotations

DEMO_PROMPTS = [
    ("code completion", "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n", False),
    ("code chat", "Write a Python function that checks whether a string is a palindrome.", True),
    ("prose", "Explain in two sentences why the sky is blue.", True),
]
# The in-process stage decodes each prompt twice (target only, then speculative): it keeps to the code prompts.
IN_PROCESS_PROMPTS = DEMO_PROMPTS[:2]
# A system turn and a user turn, rendered through the model's own chat template by the gateway.
HTTP_MESSAGES = [
    {"role": "system", "content": "You are a concise Python expert. Answer with code only."},
    {"role": "user", "content": "Reverse a linked list in Python."},
]
