"""The words a pipeline's training captions used, saved beside its CLIP (`clip/vocabulary.txt`, one a line), so
that a prompt's words it never saw are named in a warning rather than drawn as something else in silence."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

VOCABULARY_FILE = "vocabulary.txt"


def words(text: str) -> list[str]:
    """The words of a caption or prompt as the vocabulary counts them: lower-case letter runs and digit runs."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


def vocabulary_of(captions: Iterable[str]) -> frozenset[str]:
    return frozenset(w for caption in captions for w in words(caption))


def save_vocabulary(folder: Path, vocabulary: Iterable[str]) -> None:
    from unclip.checkpoint import atomic_write_text

    atomic_write_text(Path(folder) / VOCABULARY_FILE, "".join(f"{w}\n" for w in sorted(set(vocabulary))))


def load_vocabulary(folder: Path) -> Optional[frozenset[str]]:
    """The vocabulary saved in a stage folder, or None (a pipeline trained before vocabularies were saved)."""
    path = Path(folder) / VOCABULARY_FILE
    if not path.is_file():
        return None
    return frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def unknown_words(prompt: str, vocabulary: Optional[frozenset[str]]) -> list[str]:
    """The words of `prompt` its pipeline's training captions never used, in order, once each ([] without one)."""
    if not vocabulary:
        return []
    return list(dict.fromkeys(w for w in words(prompt) if w not in vocabulary))


def extend_vocabulary(folder: Path, captioner) -> None:
    """Add the words of a captioner's captions (a later stage's training data) to the vocabulary saved in `folder` (a
    pipeline's clip/), where there is one and the captioner lists its words: the pipeline has now seen them too."""
    known, vocabulary = load_vocabulary(folder), getattr(captioner, "vocabulary", None)
    if known is not None and vocabulary is not None and not vocabulary() <= known:
        save_vocabulary(folder, known | vocabulary())
