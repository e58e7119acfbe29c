"""A small, verifiable synthetic instruction task for the embedded main job.

**Cipher task.** The prompt asks to encode a short word of letters with a fixed secret
substitution cipher; the response is the encoded word, letter by letter::

    {"prompt": "encode: c a f k", "response": "m q b x"}

The answer is fully determined by the prompt, so greedy generations are checked by
exact match.

**Reversed variant** (``TaskConfig(reverse=True)``, instruction ``"encode reversed:"``): the
response is the encoding of the word read backwards (``"encode reversed: c a f k"`` →
``"x b q m"``), a composition of the cipher with a position-dependent copy that a small
student learns more slowly; with longer words (e.g. 5–9 letters) it does not saturate
within a short training run, and ROUGE-L gives partial credit for the letters it gets right
(``benchmarks/bench_methods.py``). The default configuration's outputs are unchanged.

**Why distillation can beat SFT on it.** The splits are generated so that the teacher
knows more than the student's labels tell:

* ``teacher_train`` – a large, *clean* set (the teacher's own training data);
* ``transfer`` – a smaller set the student learns from, labelled by a *sloppy
  annotator* who confuses a few letter pairs of the cipher (for ``confused_letters``
  source letters, each occurrence is encoded with the wrong partner with probability
  ``confusion_rate``). SFT on these labels learns the annotator's mistakes; the
  teacher's top-k logits on the very same samples point at the correct letters, so KD
  carries information the labels do not;
* ``validation`` / ``test`` – clean, disjoint held-out prompts (every split's prompts
  are distinct from every other split's).

Everything is deterministic in ``seed``; :func:`write_task` writes the jsonl files
(``{"id", "prompt", "response"}`` – the format :func:`nemo_kd.data.read_records`
reads) plus ``task.json`` describing the cipher and the confusions.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

__all__ = ["CipherTask", "TaskConfig", "write_task", "SPLITS"]

SPLITS = ("teacher_train", "transfer", "validation", "test")


@dataclass
class TaskConfig:
    alphabet: str = "abcdefghijklmnop"  # 16 letters
    min_len: int = 3
    max_len: int = 6
    confused_letters: int = 4  # source letters the annotator gets wrong
    confusion_rate: float = 0.5  # probability of the wrong letter, per occurrence
    sizes: Dict[str, int] = field(default_factory=lambda: {"teacher_train": 4000, "transfer": 800,
                                                           "validation": 128, "test": 256})
    seed: int = 1234
    instruction: str = "encode:"
    reverse: bool = False  # the response encodes the word read backwards (the harder variant)


class CipherTask:
    """The cipher, the annotator's confusions, and sample generation."""

    def __init__(self, cfg: Optional[TaskConfig] = None):
        self.cfg = cfg or TaskConfig()
        rng = random.Random(self.cfg.seed)
        letters = list(self.cfg.alphabet)
        shuffled = letters[:]
        while any(a == b for a, b in zip(letters, shuffled)):  # a derangement: no letter maps to itself
            rng.shuffle(shuffled)
        self.cipher: Dict[str, str] = dict(zip(letters, shuffled))
        # The annotator confuses source letter s: writes cipher[s'] for another letter s' (a wrong, but
        # plausible, cipher letter) instead of cipher[s].
        sources = rng.sample(letters, self.cfg.confused_letters)
        self.confusions: Dict[str, str] = {}
        for s in sources:
            wrong = rng.choice([c for c in shuffled if c != self.cipher[s]])
            self.confusions[s] = wrong
        self._rng = rng

    def encode(self, word: List[str]) -> List[str]:
        """The correct response's letters (the encoded word, reversed in the reversed variant)."""
        return [self.cipher[c] for c in (word[::-1] if self.cfg.reverse else word)]

    def prompt(self, word: List[str]) -> str:
        return f"{self.cfg.instruction} {' '.join(word)}"

    def answer(self, prompt: str) -> str:
        """The correct response of a prompt of this task (for checking generations)."""
        word = prompt[len(self.cfg.instruction):].split()
        return " ".join(self.encode(word))

    def _noisy(self, word: List[str], rng: random.Random) -> List[str]:
        out = []
        for c in (word[::-1] if self.cfg.reverse else word):
            if c in self.confusions and rng.random() < self.cfg.confusion_rate:
                out.append(self.confusions[c])
            else:
                out.append(self.cipher[c])
        return out

    def generate(self) -> Dict[str, List[dict]]:
        """All splits: ``{split: [{"id", "prompt", "response"}, ...]}`` with disjoint prompts."""
        cfg = self.cfg
        rng = random.Random(cfg.seed + 1)
        seen = set()
        out: Dict[str, List[dict]] = {}
        for split in SPLITS:
            rows = []
            while len(rows) < cfg.sizes[split]:
                n = rng.randint(cfg.min_len, cfg.max_len)
                word = [rng.choice(cfg.alphabet) for _ in range(n)]
                key = "".join(word)
                if key in seen:
                    continue
                seen.add(key)
                response = self._noisy(word, rng) if split == "transfer" else self.encode(word)
                rows.append({"id": f"{split}-{len(rows)}", "prompt": self.prompt(word), "response": " ".join(response)})
            out[split] = rows
        return out

    def describe(self) -> dict:
        config = asdict(self.cfg)
        if not config["reverse"]:  # the default task's task.json stays byte-identical to the pre-variant one
            del config["reverse"]
        return {"config": config, "cipher": self.cipher, "annotator_confusions": self.confusions}


def write_task(out_dir: str, cfg: Optional[TaskConfig] = None) -> Dict[str, str]:
    """Write ``<split>.jsonl`` for every split and ``task.json``; returns ``{split: path}``."""
    task = CipherTask(cfg)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, rows in task.generate().items():
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        paths[split] = path
    with open(os.path.join(out_dir, "task.json"), "w") as f:
        json.dump(task.describe(), f, indent=2)
        f.write("\n")
    return paths
