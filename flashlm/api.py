"""The public Python surface: load(), and the pieces the CLI and server share."""
from __future__ import annotations

from flashlm.offload.store import Store
from flashlm.runtime.tokenizer import Tokenizer


def open_tokenizer(store: Store) -> Tokenizer:
    """The runtime Tokenizer of a store: tokenizer.json, chat template, special tokens."""
    return Tokenizer.from_files(store.tokenizer_path, chat_template=store.chat_template, special=store.tokenizer_info)
