"""Reference outputs of Hugging Face `transformers`' logits processors, for quill's sampler
tests (crates/quill/src/sample/tests.rs reads tests/fixtures/sampling/reference.json).

    python3 scripts/make_sampling_reference.py   # needs torch and transformers

Each case: random logits for a vocabulary of 64, a token history (prompt + generated ids,
with repeats), and what transformers makes of them: the repetition penalty's processed
logits, and the ids that survive temperature -> top-k -> top-p -> min-p (transformers'
order in `generate`), for several settings.
"""
import json
from pathlib import Path

import torch
import transformers
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sampling" / "reference.json"
g = torch.Generator().manual_seed(20261206)
V = 64
cases = []
for case in range(6):
    logits = (torch.randn(1, V, generator=g, dtype=torch.float64) * 3).float()
    history = torch.randint(0, V, (1, 12), generator=g)
    history[0, 5:8] = history[0, 0]  # a token that repeats
    penalty = [1.3, 0.8, 2.0, 1.0, 1.15, 1.5][case]
    rep = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    cuts = []
    for temperature, top_k, top_p, min_p in [(0.7, 0, 1.0, 0.1), (1.0, 10, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
                                             (0.8, 20, 0.9, 0.05), (1.0, 0, 1.0, 0.3), (0.5, 5, 0.95, 0.2)]:
        x = TemperatureLogitsWarper(temperature)(history, rep.clone())
        if top_k:
            x = TopKLogitsWarper(top_k)(history, x)
        if top_p < 1.0:
            x = TopPLogitsWarper(top_p)(history, x)
        if min_p > 0.0:
            x = MinPLogitsWarper(min_p)(history, x)
        kept = sorted(int(i) for i in torch.nonzero(torch.isfinite(x[0])).flatten())
        probs = torch.softmax(x[0].double(), -1)
        cuts.append({"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                     "kept": kept, "kept_probs": [float(probs[i]) for i in kept]})
    cases.append({"logits": logits[0].tolist(), "history": history[0].tolist(),
                  "repetition_penalty": penalty, "after_repetition_penalty": rep[0].tolist(), "cuts": cuts})
OUT.write_text(json.dumps({"made_by": f"transformers {transformers.__version__}, torch {torch.__version__}",
                           "cases": cases}, indent=1) + "\n")
print(f"wrote {OUT}")
