"""`load_fast_tokenizer`: a model folder's files, through its backend, into a `FastTokenizer`."""
from __future__ import annotations

from pathlib import Path

from common.errors import CheckpointError
from common.fast_tokenizer.backend import build_backend, tokenizer_flavour
from common.fast_tokenizer.folder import read_tokenizer_files
from common.fast_tokenizer.tokenizer import FastTokenizer


def load_fast_tokenizer(path: str | Path) -> FastTokenizer:
    """The tokenizer of a model folder (tokenizer.json + tokenizer_config.json), without torch or transformers.

    Raises CheckpointError naming the folder when tokenizer.json is missing or unreadable, or a config file is corrupt.
    """
    folder = Path(path)
    config, spec = read_tokenizer_files(folder)
    flavour = tokenizer_flavour(folder, config)
    backend = build_backend(folder, config, spec, flavour)
    try:
        return FastTokenizer(backend, config, folder, flavour, spec)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"no usable tokenizer in {str(folder)!r}: {e}") from e
