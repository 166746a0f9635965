"""Tokenizers: text <-> token ids, streaming detokenization and chat templates."""

from chat_core.tokenizer.base import Tokenizer, TokenizerError, TokenizerSettings
from chat_core.tokenizer.chat_template import render_chat_template
from chat_core.tokenizer.detokenizer import IncrementalDetokenizer
from chat_core.tokenizer.gguf_tokenizer import build_gguf_tokenizer
from chat_core.tokenizer.hf_tokenizer import HFTokenizer
from chat_core.tokenizer.loading import load_tokenizer, read_tokenizer_settings, tokenizer_from_gguf
from chat_core.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

__all__ = [
    "HFTokenizer",
    "IncrementalDetokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerSettings",
    "build_gguf_tokenizer",
    "load_tokenizer",
    "read_tokenizer_settings",
    "render_chat_template",
    "tokenizer_from_gguf",
]
