"""Wordle: find a hidden 5-letter word in 6 guesses from per-letter colour feedback.

Choices (the rollout loop and the generator rely on them):
    * Action ``guess[word]``; also accepted: "guess word", "guess: WORD", a bare 5-letter word.
      A malformed action, or a word outside ``assets/wordle/guesses.txt``, is answered with an
      explanation and uses no guess; it still counts toward ``max_turns``.
    * Score 1.0 when solved (whatever the number of guesses), else 0.0. The episode ends on the
      answer, after 6 guesses, or at ``max_turns`` actions.
    * Split: a word of ``answers.txt`` is a test word when ``stable_hash`` puts it in one fifth,
      else a train word. A task's seed is the word's index in ``answers.txt``, so the two
      splits never share a seed; past a split's size the tasks repeat.
    * Expert: keeps the answers consistent with all feedback and guesses the answer word that
      minimises the expected number left (sum of squared feedback-bucket sizes), a candidate
      winning ties.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np

from atlas.envs.base import Environment, Feedback, Split, Task, stable_hash, tool

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "wordle"
GREY, YELLOW, GREEN = 0, 1, 2
SYMBOL = "-YG"
MAX_GUESSES = 6
TEST_BUCKETS = 5  # one in five answers is a test word
ACTION = re.compile(r"^\s*(?:guess\b\s*[\[(:]?|[\[(]?)\s*['\"]?([a-z]{5})['\"]?\s*[\])]?\s*\.?\s*$",
                    re.IGNORECASE)

ANSWERS = (ASSETS / "answers.txt").read_text().split()
GUESSES = frozenset((ASSETS / "guesses.txt").read_text().split()) | frozenset(ANSWERS)
INDEX = {w: i for i, w in enumerate(ANSWERS)}


def feedback(guess: str, answer: str) -> tuple[int, ...]:
    """Standard Wordle marks: greens first, then yellows left to right while copies remain."""
    marks = [GREY] * 5
    left = Counter(a for g, a in zip(guess, answer) if g != a)
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            marks[i] = GREEN
        elif left[g] > 0:
            marks[i], left[g] = YELLOW, left[g] - 1
    return tuple(marks)


def pattern_codes(guesses: list[str], answers: list[str]) -> np.ndarray:
    """``feedback`` for every (guess, answer) pair, coded sum(mark_i * 3**i), vectorised."""
    g = np.array([[ord(c) for c in w] for w in guesses], dtype=np.uint8)
    a = np.array([[ord(c) for c in w] for w in answers], dtype=np.uint8)
    green = [g[:, k, None] == a[None, :, k] for k in range(5)]
    codes = np.zeros((len(guesses), len(answers)), dtype=np.uint8)
    for i in range(5):
        letter = g[:, i, None]
        # A letter is yellow while the answer's unmatched copies outnumber its earlier yellows.
        unmatched = sum(((a[None, :, k] == letter) & ~green[k]).view(np.uint8) for k in range(5))
        earlier = sum(((g[:, j, None] == letter) & ~green[j]).view(np.uint8) for j in range(i))
        yellow = ~green[i] & (earlier < unmatched)
        codes += green[i].view(np.uint8) * np.uint8(2 * 3 ** i)
        codes += yellow.view(np.uint8) * np.uint8(3 ** i)
    return codes


@functools.cache
def _table() -> np.ndarray:
    return pattern_codes(ANSWERS, ANSWERS)  # ~0.3 s once; the expert's lookup table


def _bucket_sizes(cands: np.ndarray) -> np.ndarray:
    """(guess, feedback code) -> number of candidates, for every answer word as the guess."""
    sub = _table()[:, cands].astype(np.int64) + 243 * np.arange(len(ANSWERS))[:, None]
    return np.bincount(sub.ravel(), minlength=243 * len(ANSWERS)).reshape(len(ANSWERS), 243)


@functools.cache
def _opener() -> tuple[str, int, np.ndarray]:
    """The best first guess, its number of feedback patterns, and every word's pattern count."""
    sizes = _bucket_sizes(np.arange(len(ANSWERS)))
    best = int(np.argmin((sizes.astype(np.int64) ** 2).sum(1)))
    groups = (sizes > 0).sum(1)
    return ANSWERS[best], int(groups[best]), groups


def _split_of(word: str) -> str:
    return "test" if stable_hash(f"wordle/{word}") % TEST_BUCKETS == 0 else "train"


@functools.cache
def _split_seeds(split: str) -> tuple[int, ...]:
    seeds = [i for i, w in enumerate(ANSWERS) if _split_of(w) == split]
    return tuple(sorted(seeds, key=lambda i: stable_hash(f"wordle-order/{ANSWERS[i]}")))


def describe(guess: str, marks: tuple[int, ...]) -> str:
    """Per-letter feedback an LLM can read; a grey copy of a scored letter means 'no more'."""
    scored = {c for c, m in zip(guess, marks) if m != GREY}
    parts = []
    for c, m in zip(guess.upper(), marks):
        text = ("correct position" if m == GREEN else "in word but wrong position" if m == YELLOW
                else f"no more {c} in word" if c.lower() in scored else "not in word")
        parts.append(f"{c}: {text}")
    return ", ".join(parts) + f". Pattern: {''.join(SYMBOL[m] for m in marks)}"


class WordleEnv(Environment):
    """Wordle with an information-maximising expert (see the module docstring for the rules)."""

    instruction = (
        "You play Wordle: find the hidden 5-letter English word in 6 guesses. Act with "
        "guess[word], e.g. guess[crane]. After each guess every letter is marked: correct "
        "position (G), in word but wrong position (Y), or not in word (-); a repeated letter "
        "marked '-' means the word has no more copies of it. Guessing an unknown word or an "
        "invalid action uses no guess.")

    tools_instruction = (
        "You play Wordle: find the hidden 5-letter English word in 6 guesses, one guess per turn "
        "with the guess tool. After each guess every letter is marked: correct position (G), in "
        "word but wrong position (Y), or not in word (-); a repeated letter marked '-' means the "
        "word has no more copies of it. Guessing an unknown word uses no guess.")
    tools = [tool("guess", "Guess a 5-letter English word.", {"word": {"type": "string"}})]

    @classmethod
    def action_to_call(cls, action: str) -> tuple[str, dict] | None:
        word = cls.canonical_action(action)
        return None if word is None else ("guess", {"word": word})

    @classmethod
    def call_to_action(cls, name: str, args: dict) -> str | None:
        word = args.get("word")
        return f"guess[{word}]" if name == "guess" and isinstance(word, str) else None

    def __init__(self, name: str = "wordle", tasks: list[str] = ("wordle",), max_turns: int = 10):
        super().__init__(name, list(tasks), max_turns)
        self.secret, self.history, self.turns, self.done = "", [], 0, True

    def seed_for(self, name: str, split: str, index: int) -> int:
        Split.of(split, "split")
        seeds = _split_seeds(split)
        return seeds[index % len(seeds)]

    # ---- episode -----------------------------------------------------------------------------
    @classmethod
    def canonical_action(cls, action: str | None) -> str | None:
        match = ACTION.match(action or "")  # "guess[crane]", "guess: CRANE", "crane"
        ok = match and (action or "").strip().lower() != "guess"
        return match.group(1).lower() if ok else None

    def reset(self, task: Task) -> str:
        if not 0 <= task.seed < len(ANSWERS) or _split_of(ANSWERS[task.seed]) != task.split:
            raise ValueError(f"{task.id}: seed is not a {task.split} word index")
        self.secret, self.history, self.turns, self.done = ANSWERS[task.seed], [], 0, False
        return (f"Goal: guess the hidden 5-letter word within {MAX_GUESSES} guesses. "
                f"No guesses yet; {MAX_GUESSES} guesses left.")

    def step(self, action: str) -> Feedback:
        if self.done:
            return self._feedback("The episode is over.")
        self.turns += 1
        word = self.canonical_action(action)
        if word is None:
            obs = (f"Invalid action {action!r}: use guess[word] with a 5-letter English word, "
                   "e.g. guess[crane]. No guess was used.")
        elif word not in GUESSES:
            obs = f"{word.upper()} is not in the word list. No guess was used."
        else:
            marks = feedback(word, self.secret)
            self.history.append((word, marks))
            n = len(self.history)
            left = MAX_GUESSES - n
            obs = f"Guess {n}/{MAX_GUESSES}: {word.upper()}. {describe(word, marks)}."
            if word == self.secret:
                self.done, obs = True, obs + " Solved!"
            elif left == 0:
                self.done, obs = True, f"{obs} Out of guesses: the word was {self.secret.upper()}."
            else:
                obs += f" {left} guess{'es' if left > 1 else ''} left."
        if not self.done and self.turns >= self.max_turns:
            self.done, obs = True, obs + " Turn limit reached."
        return self._feedback(obs)

    def _feedback(self, obs: str) -> Feedback:
        solved = bool(self.history) and self.history[-1][0] == self.secret
        return Feedback(obs, done=self.done, score=float(solved), success=solved)

    # ---- expert ------------------------------------------------------------------------------
    def _candidates(self, history: list | None = None) -> np.ndarray:
        """Indices of the answers consistent with ``history`` (default: the episode so far)."""
        cands = np.arange(len(ANSWERS))
        for word, marks in self.history if history is None else history:
            code = sum(m * 3 ** i for i, m in enumerate(marks))
            row = _table()[INDEX[word]] if word in INDEX else pattern_codes([word], ANSWERS)[0]
            cands = cands[row[cands] == code]
        return cands

    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        if not self.history:
            opener, groups, _ = _opener()
            wasted = f"{after_mistake!r} was not an accepted guess. " if after_mistake else ""
            return (wasted + f"No feedback yet, so all {len(ANSWERS)} words are possible. "
                    f"{opener.upper()} uses common letters and splits them into {groups} feedback "
                    "patterns, the best first guess.", f"guess[{opener}]")
        thought = self._recovery(after_mistake) if after_mistake else self._summary()
        cands = self._candidates()
        names = [ANSWERS[i].upper() for i in cands]
        if len(cands) <= 2:
            why = (f"Only {names[0]} fits all the feedback, so guess it." if len(cands) == 1 else
                   f"Two words fit: {names[0]} and {names[1]}. Guessing {names[0]} either wins "
                   f"or leaves {names[1]}.")
            return f"{thought} {why}", f"guess[{names[0].lower()}]"
        sizes = _bucket_sizes(cands)
        is_cand = np.zeros(len(ANSWERS), dtype=bool)
        is_cand[cands] = True
        # Fewest words left on average (sum of squared bucket sizes), then one that could win.
        best = int(np.lexsort((~is_cand, (sizes.astype(np.int64) ** 2).sum(1)))[0])
        groups, worst = int((sizes[best] > 0).sum()), int(sizes[best].max())
        why = " and could itself be the answer" if is_cand[best] else ", even though it cannot win"
        examples = ", ".join(names[::len(names) // 5 or 1][:5]) + (", ..." * (len(names) > 5))
        return (f"{thought} {len(cands)} words still fit ({examples}). {ANSWERS[best].upper()} "
                f"splits them into {groups} patterns (at most {worst} left afterwards){why}.",
                f"guess[{ANSWERS[best]}]")

    def _summary(self) -> str:
        """What the last feedback revealed and what is known so far."""
        word, marks = self.history[-1]
        greens, present, absent = _knowledge(self.history)
        text = f"{word.upper()} scored {''.join(SYMBOL[m] for m in marks)}."
        yellow = {word[i] for i in range(5) if marks[i] == YELLOW}
        if yellow:
            text += f" {_letters(yellow)} in the word but elsewhere."
        text += f" Known so far: {_pattern(greens)}"
        if present - set(greens.values()):
            text += f", also contains {_letters(present - set(greens.values()))}"
        return text + f"; ruled out: {_letters(absent) or 'nothing'}."

    def _recovery(self, action: str) -> str:
        """Why the injected guess ``action`` was wrong, then the usual summary."""
        match = ACTION.match(action or "")
        word = match.group(1).lower() if match else None
        if self.history[-1][0] != word:
            return f"{action!r} was not an accepted guess and wasted a turn. {self._summary()}"
        before = self.history[:-1]
        if not before:
            return (f"Opening with {word.upper()} wasted much of a guess: its letters split the "
                    f"words poorly. Still, {self._summary()}")
        greens, present, absent = _knowledge(before)
        faults = [f"it used {_letters(absent & set(word))}, already ruled out" if absent & set(word)
                  else "",
                  "it dropped the known " + ", ".join(f"{c.upper()} in position {i + 1}"
                                                    for i, c in greens.items() if word[i] != c)
                  if any(word[i] != c for i, c in greens.items()) else "",
                  f"it left out {_letters(present - set(word))}" if present - set(word) else ""]
        fault = "; ".join(f for f in faults if f) or "it did not fit the earlier feedback"
        return (f"Guessing {word.upper()} wasted a guess: {fault}, so it could not be the answer. "
                f"Back to the words that fit everything. {self._summary()}")

    def mistake(self, rng: random.Random) -> tuple[str, str]:
        if not self.history:
            # No information to ignore yet: a weak opener (one of the 100 worst splitters).
            worst = np.argsort(_opener()[2], kind="stable")[:100]
            word = rng.choice([ANSWERS[i] for i in worst if ANSWERS[i] != self.secret])
            return (f"Start with {word.upper()}: a distinctive word might hit the answer "
                    "directly.", f"guess[{word}]")
        greens, _, absent = _knowledge(self.history)
        fits = set(self._candidates().tolist())
        wrong = [i for i in range(len(ANSWERS)) if i not in fits and ANSWERS[i] != self.secret]
        reuse = [i for i in wrong if absent & set(ANSWERS[i])]
        keep = [i for i in reuse if all(ANSWERS[i][p] == c for p, c in greens.items())]
        word = ANSWERS[rng.choice(keep or reuse or wrong)]
        if keep and greens:
            return (f"{word.upper()} matches the greens so far ({_pattern(greens)}) and is a "
                    "common word, so it may well be the answer.", f"guess[{word}]")
        return f"{word.upper()} is a common word with some fresh letters; try it.", f"guess[{word}]"


def _knowledge(history: list) -> tuple[dict[int, str], set[str], set[str]]:
    """Known green positions, letters known present, letters known absent."""
    greens = {i: w[i] for w, m in history for i in range(5) if m[i] == GREEN}
    present = {w[i] for w, m in history for i in range(5) if m[i] != GREY}
    absent = {w[i] for w, m in history for i in range(5) if m[i] == GREY} - present
    return greens, present, absent


def _letters(letters: set[str]) -> str:
    return ", ".join(sorted(letters)).upper()


def _pattern(greens: dict[int, str]) -> str:
    return "".join(greens.get(i, "_") for i in range(5)).upper()
