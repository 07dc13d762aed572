"""Language consistency: the share of a completion's words written in the prompt's language.

DeepSeek-R1 adds this reward to stop the chain of thought from mixing
languages: "the proportion of target language words in the CoT". Here

    r_i = (# words of the reasoning in the prompt's scripts) / (# words of the reasoning)

The reasoning is the text inside the think tags when there are any, else the
whole completion. A language is identified by its writing system (Unicode
script: Latin, Han, Cyrillic, Arabic, ...), which is what separates the
languages that R1's reasoning mixed (Chinese and English) without a language-ID
model; it does not tell English from French. The prompt's scripts are those
holding at least 20% of its words, so a Japanese prompt (kanji and kana) accepts
both; hiragana and katakana count as one script. Words: runs of letters of one
script; each Han, kana or Hangul character is a word of its own. LaTeX
commands, fenced code and one-letter Latin words (variables) are ignored. The
score is None when the prompt or the reasoning has no words (pure arithmetic).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from r1kit.rewards.protocol import completion_text
from r1kit.rewards.registry import register

_IGNORED_RE = re.compile(r"```.*?(?:```|$)|\\[A-Za-z]+", re.DOTALL)
_LETTERS_RE = re.compile(r"[^\W\d_]+")
_CHARACTER_WORD_SCRIPTS = frozenset({"CJK", "KANA", "HANGUL"})
_SCRIPT_ALIASES = {"FULLWIDTH": "LATIN", "HALFWIDTH": "KANA", "HIRAGANA": "KANA", "KATAKANA": "KANA"}
MIN_SCRIPT_SHARE = 0.2
MAX_CHARS = 50_000  # longer texts are judged on their first MAX_CHARS characters


@lru_cache(maxsize=65536)
def script_of(char: str) -> str:
    """Unicode script family of a letter: "LATIN", "CJK" (Han), "KANA" (hiragana and katakana), ..."""
    first_word = unicodedata.name(char, "UNKNOWN").split(" ", 1)[0]
    return _SCRIPT_ALIASES.get(first_word, first_word)


def script_word_counts(text: str) -> Counter[str]:
    """Number of words per script in `text` (see the module docstring for what a word is).

    >>> dict(script_word_counts("Solve x: 求解 the equation"))
    {'LATIN': 3, 'CJK': 2}
    """
    counts: Counter[str] = Counter()
    for run in _LETTERS_RE.findall(_IGNORED_RE.sub(" ", text[:MAX_CHARS])):
        start = 0
        for index in range(1, len(run) + 1):
            if index < len(run) and script_of(run[index]) == script_of(run[start]):
                continue
            script, length = script_of(run[start]), index - start
            if script in _CHARACTER_WORD_SCRIPTS:
                counts[script] += length
            elif not (script == "LATIN" and length == 1):
                counts[script] += 1
            start = index
    return counts


def _reasoning(text: str, open_tag: str, close_tag: str) -> str:
    start = text.find(open_tag)
    if start < 0:
        return text
    end = text.find(close_tag, start)
    return text[start + len(open_tag) : end if end >= 0 else len(text)]


@dataclass(frozen=True)
class LanguageConsistency:
    """Share of the reasoning's words in the prompt's scripts, in [0, 1]; None without words.

    >>> LanguageConsistency()(["<think>先算 12 加 7 equals 19</think>"], prompts=["计算 12 加 7 乘 2"])
    [0.75]
    """

    think_tags: tuple[str, str] = ("<think>", "</think>")
    __name__ = "language_consistency"
    elementwise = True  # scores each completion on its own: the suite may run one per task

    def __call__(self, completions: list[Any], *, prompts: list[Any], **columns: Any) -> list[float | None]:
        scores: list[float | None] = []
        for completion, prompt in zip(completions, prompts, strict=True):
            prompt_counts = script_word_counts(completion_text(prompt))
            total_prompt = sum(prompt_counts.values())
            words = script_word_counts(_reasoning(completion_text(completion), *self.think_tags))
            total = sum(words.values())
            if not total_prompt or not total:
                scores.append(None)
                continue
            targets = {s for s, n in prompt_counts.items() if n >= MIN_SCRIPT_SHARE * total_prompt}
            scores.append(sum(words[s] for s in targets) / total)
        return scores


language_consistency = register("language_consistency")(LanguageConsistency())
