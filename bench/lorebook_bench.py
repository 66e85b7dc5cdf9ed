"""Lorebook scan benchmark: 2,000 entries scanned over the 20 most recent messages.

Prints JSON (median/p95 ms per scan, compile time, activations) and writes
`bench/results/lorebook.json`. The target is under 10 ms per scan for the typical book. Not a
test: this machine is shared, so read each figure next to the naive peer measured in the same
run (one precompiled `re.search` per key per message, a scanner without an index).

One book (1% regex keys, 20% with secondary keys, 10% of entries mention another entry's key
so recursion has work to do), three settings: `budgeted` (a 2,048-token lore budget, the
usual set-up, recursion to depth 3), `matching_only` (no budget, no recursion: the cost of
matching alone) and `unbudgeted` (no budget, recursion to depth 3: a stress case where
~200 activated entries are re-scanned as recursion text).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from talkloop.characters.lorebook import LoreScanner, ScanSettings
from talkloop.characters.lorebook.entries import EntryDefaults
from talkloop.characters.model import Lorebook, LorebookEntry

NUM_ENTRIES = 2_000
NUM_MESSAGES = 20
WORDS_PER_MESSAGE = 60
KEYWORDS_PER_MESSAGE = 3
NUM_SCANS = 200
SEED = 1234
RESULTS = Path(__file__).parent / "results" / "lorebook.json"


REGEX_SHARE = 0.01
MENTION_SHARE = 0.10
SCENARIOS: dict[str, ScanSettings] = {
    "budgeted": ScanSettings(EntryDefaults(scan_depth=NUM_MESSAGES), token_budget=2_048),
    "matching_only": ScanSettings(EntryDefaults(scan_depth=NUM_MESSAGES), max_recursion_depth=0),
    "unbudgeted": ScanSettings(EntryDefaults(scan_depth=NUM_MESSAGES)),
}


def vocabulary(rng: random.Random, size: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choice(letters) for _ in range(rng.randint(3, 10))) for _ in range(size)}
    return sorted(words)


def make_entry(rng: random.Random, index: int, words: tuple[list[str], list[str]]) -> LorebookEntry:
    keywords, filler = words
    keys = [" ".join(rng.sample(keywords, rng.choice((1, 1, 1, 2)))) for _ in range(3)]
    if rng.random() < REGEX_SHARE:
        keys = [f"/{rng.choice(keywords)}s?/i"]
    secondary = rng.sample(keywords, 2) if rng.random() < 0.2 else []
    mention = [rng.choice(keywords)] if rng.random() < MENTION_SHARE else []
    return LorebookEntry(
        keys=keys,
        secondary_keys=secondary,
        selective=bool(secondary),
        content=f"Lore entry {index}: " + " ".join(rng.sample(filler, 40) + mention),
        insertion_order=rng.randint(0, 200),
        case_sensitive=rng.random() < 0.1,
        constant=rng.random() < 0.01,
        extensions={"match_whole_words": rng.random() < 0.5, "selectiveLogic": rng.randint(0, 3)},
        id=index,
    )


def make_messages(rng: random.Random, words: tuple[list[str], list[str]]) -> list[str]:
    keywords, filler = words
    messages = []
    for _ in range(NUM_MESSAGES):
        picked = rng.choices(filler, k=WORDS_PER_MESSAGE)
        for slot in rng.sample(range(WORDS_PER_MESSAGE), KEYWORDS_PER_MESSAGE):
            picked[slot] = rng.choice(keywords).capitalize()
        messages.append(" ".join(picked) + ".")
    return messages


def naive_patterns(book: Lorebook) -> list[re.Pattern[str]]:
    return [
        re.compile(re.escape(key), 0 if entry.case_sensitive else re.IGNORECASE)
        for entry in book.entries
        for key in entry.keys
    ]


def naive_scan(patterns: list[re.Pattern[str]], messages: list[str]) -> list[bool]:
    return [any(p.search(m) for m in messages) for p in patterns]


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def make_book() -> tuple[Lorebook, list[str]]:
    rng = random.Random(SEED)
    words = vocabulary(rng, 6_000)
    split = (words[:3_000], words[3_000:])
    book = Lorebook(entries=[make_entry(rng, i, split) for i in range(NUM_ENTRIES)])
    return book, make_messages(rng, split)


def run(
    name: str, settings: ScanSettings, book: Lorebook, messages: list[str]
) -> dict[str, object]:
    start = time.perf_counter()
    scanner = LoreScanner(book, settings=settings)
    compile_ms = (time.perf_counter() - start) * 1e3
    result = scanner.scan(messages, turn=10)
    scan_ms = timed(lambda: scanner.scan(messages, turn=10), NUM_SCANS)
    return {
        "scenario": name,
        "num_activated": len(result.entries),
        "num_activated_by_recursion": sum(1 for e in result.entries if e.recursion_round),
        "num_dropped_by_budget": len(result.dropped_uids),
        "compile_ms": round(compile_ms, 2),
        "scan_median_ms": round(statistics.median(scan_ms), 3),
        "scan_p95_ms": round(statistics.quantiles(scan_ms, n=20)[-1], 3),
    }


def main() -> None:
    book, messages = make_book()
    patterns = naive_patterns(book)
    naive_ms = timed(lambda: naive_scan(patterns, messages), 20)
    report = {
        "benchmark": "lorebook_scan",
        "num_entries": NUM_ENTRIES,
        "num_messages": NUM_MESSAGES,
        "num_chars_scanned": sum(len(message) for message in messages),
        "target_ms": 10.0,
        "python": sys.version.split()[0],
        "scenarios": [run(name, s, book, messages) for name, s in SCENARIOS.items()],
        "naive_per_key_regex_median_ms": round(statistics.median(naive_ms), 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
