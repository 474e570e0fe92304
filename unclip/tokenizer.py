"""open_clip's BPE tokenizer with a short context and a per-caption cache.

`open_clip/__init__.py` pulls in its whole model zoo (seconds of start-up), so the tokenizer module,
which has no package-relative imports, is loaded on its own from the installed package.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from functools import lru_cache

import torch

log = logging.getLogger(__name__)
VOCAB_SIZE = 49408  # open_clip's BPE vocabulary, start and end tokens included; the end token has the largest id


@lru_cache(maxsize=1)
def _bpe():
    """open_clip's SimpleTokenizer with its defaults: the one its tokenizer module builds when it loads (building a
    second would cost as much again, 0.1-0.2 s of every process's first caption)."""
    name = "open_clip.tokenizer"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("open_clip_torch is not installed: pip install -r requirements.txt")
        path = f"{spec.submodule_search_locations[0]}/tokenizer.py"
        module_spec = importlib.util.spec_from_file_location("_unclip_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    default = getattr(module, "_tokenizer", None)
    return default if isinstance(default, module.SimpleTokenizer) else module.SimpleTokenizer()


@lru_cache(maxsize=100_000)
def _word_length(word: str) -> int:
    """How many BPE tokens a whitespace word of a caption takes (its cleaning costs most of an encode: cached)."""
    return len(_bpe().encode(word))


@lru_cache(maxsize=1)
def vocabulary_words() -> tuple[str, ...]:
    """The BPE vocabulary's whole words of three or more ASCII letters (about 32,000: English words and names), in
    its order."""
    return tuple(w[:-4] for w in _bpe().encoder if w.endswith("</w>") and len(w) >= 7 and w[:-4].isascii()
                 and w[:-4].isalpha())


class Tokenizer:
    """Encode captions to `[B, context]` token ids: start token, BPE tokens, end token, zero padding. A caption
    longer than the context is cut; the first `SHOWN` cut ones are logged, the rest counted (`truncated`)."""

    SHOWN = 3

    def __init__(self, context: int):
        self.context = context
        self.truncated = 0  # captions cut (one the cache holds, once)
        self._cache: dict[str, torch.Tensor] = {}

    def ids(self, text: str) -> torch.Tensor:
        cached = self._cache.get(text)
        if cached is None:
            bpe = _bpe()
            tokens = bpe.encode(text)
            if len(tokens) > self.context - 2:
                self.truncated += 1
                if self.truncated <= self.SHOWN:
                    more = "; further ones are counted, not shown" if self.truncated == self.SHOWN else ""
                    log.warning("caption truncated to %d tokens: %r%s", self.context - 2, text[:80], more)
                tokens = tokens[: self.context - 2]
            ids = [bpe.sot_token_id, *tokens, bpe.eot_token_id]
            cached = torch.zeros(self.context, dtype=torch.long)
            cached[: len(ids)] = torch.tensor(ids)
            if len(self._cache) < 100_000:
                self._cache[text] = cached
        return cached

    def word_spans(self, text: str) -> list[tuple[int, int]]:
        """Where each whitespace word of `text` lies in `ids(text)`: [start, end) token positions (the start token is
        position 0); BPE encodes a caption word by word, so the spans tile its tokens. Cut at the context, as `ids`."""
        spans, start = [], 1
        for word in text.split():
            end = start + _word_length(word)
            spans.append((min(start, self.context - 1), min(end, self.context - 1)))
            start = end
        return spans

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.ids(t) for t in texts])

    @staticmethod
    def mask(tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) True up to and including each caption's end token, which has the largest id. Not `tokens != 0`:
        id 0 is padding but also the BPE token of a "!" inside a word."""
        return torch.arange(tokens.shape[1], device=tokens.device)[None] <= tokens.argmax(-1)[:, None]

