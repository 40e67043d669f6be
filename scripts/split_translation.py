#!/usr/bin/env python3
"""Splits eng-fra.tsv (20,000 Tatoeba pairs, CC-BY 2.0 FR; see data/LICENSES.md) into the
translation demo's data/translation/train.tsv and dev.tsv: 300 pairs drawn with random.Random(7) are the dev split, never trained
on; every other pair whose English or French side equals a dev sentence is dropped from
train, so the dev sentences are unseen. Both keep the file's order.

    python3 scripts/split_translation.py PATH/TO/eng-fra.tsv
"""
import random
import sys
from pathlib import Path

d = Path(__file__).resolve().parents[1] / "data" / "translation"
pairs = [line.rstrip("\n").split("\t") for line in Path(sys.argv[1]).read_text().splitlines() if line]
dev_idx = set(random.Random(7).sample(range(len(pairs)), 300))
dev = [p for i, p in enumerate(pairs) if i in dev_idx]
seen = {p[0] for p in dev} | {p[1] for p in dev}
train = [p for i, p in enumerate(pairs) if i not in dev_idx and p[0] not in seen and p[1] not in seen]
(d / "dev.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in dev))
(d / "train.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in train))
print(f"{len(train)} train pairs, {len(dev)} dev pairs")
