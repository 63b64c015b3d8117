"""The fixed prompt set every benchmark uses: code completion, code chat, prose, factual Q&A."""
from __future__ import annotations

# (name, kind, text, use_chat_template)
PROMPTS: list[tuple[str, str, str, bool]] = [
    ("code_quicksort", "code", "def quicksort(arr):\n    \"\"\"Sort a list of numbers with quicksort and return it.\"\"\"\n", False),
    ("code_lru", "code", "class LRUCache:\n    \"\"\"A least-recently-used cache with O(1) get and put.\"\"\"\n\n"
     "    def __init__(self, capacity: int):\n", False),
    ("code_chat_json", "code", "Write a Python function that parses a JSON file of users and returns the "
     "names of those older than 30, with type hints and a docstring.", True),
    ("code_chat_sql", "code", "Explain with an example how to write a SQL query that finds the second highest "
     "salary in an employees table.", True),
    ("prose_story", "prose", "Write a short story about a lighthouse keeper who finds a message in a bottle.", True),
    ("prose_essay", "prose", "The history of the printing press begins in", False),
    ("qa_photosynthesis", "qa", "What is photosynthesis, and why does it matter for life on Earth?", True),
    ("qa_tcp", "qa", "What is the difference between TCP and UDP?", True),
]
