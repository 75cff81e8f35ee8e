"""A CLIP tokenizer made here for a small word list: every listed word is one token.

It is a real CLIP byte-level BPE tokenizer folder (vocab.json + merges.txt), so transformers'
``CLIPTokenizer``, diffusers' and optimum's SD pipelines and the bundle's numpy tokenizer read it
unchanged. The merges are learned by byte-pair encoding on the word list itself (each word once)
until every word is a single symbol: encoding applies merges by rank, which replays that training,
so a listed word always comes out whole. Any other text still tokenizes, byte by byte: all 256
byte symbols are in the vocabulary, alone and word-final.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # SD's context length: deploykit's export, bench and bundle shapes assume it


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first (ties: the pair seen first), until each word is one symbol."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    symbols = [list("".join(byte_chars[b] for b in w.encode("utf-8"))) for w in words]
    for s in symbols:
        s[-1] += "</w>"
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in symbols):
        pairs = Counter(p for s in symbols for p in zip(s, s[1:]))
        best = max(pairs, key=lambda p: pairs[p])  # Counter keeps first-seen order: ties are deterministic
        merges.append(best)
        for k, s in enumerate(symbols):
            i, merged = 0, []
            while i < len(s):
                if i < len(s) - 1 and (s[i], s[i + 1]) == best:
                    merged.append(s[i] + s[i + 1])
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            symbols[k] = merged
    return merges


def save_word_tokenizer(words: list[str], folder: str | Path):
    """Write the tokenizer folder for ``words`` and return it loaded as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    merges = learn_merges(sorted(set(words)))
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                              encoding="utf-8")
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                                  model_max_length=MAX_LENGTH, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                  unk_token=EOS)
        tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)
