"""Cross-tokenizer alignment throughput and loss overhead on CPU.

Two tokenizers are trained on the fly (byte-level BPE + ChatML as the student,
SentencePiece unigram + Llama-2 template as the teacher). For samples of about
``--tokens`` student completion tokens (mixed prose, code, digits, unicode, emoji):

* ``render+tokenise`` – both ConversationTokenizers (what the data pipeline does
  anyway, for reference);
* ``align`` – byte spans + groups from the two tokenised samples
  (:func:`nemo_kd.align.align_samples`), the cost cross-tokenizer KD adds per sample;
* ``loss`` – one forward+backward of :func:`cross_tokenizer_kd_loss` vs the
  same-tokenizer :func:`topk_kd_loss` on ``[N, V]`` student logits (the per-step
  overhead of cross-tokenizer KD in the loss; the alignment is data-side and can
  be precomputed by the offline store).

Usage: ``python benchmarks/bench_align.py [--tokens 4096] [--samples 8] [--vocab 8192] [--k 32]``
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from nemo_kd.align import align_samples, build_cross_tokenizer_batch, build_vocab_map, cross_tokenizer_kd_loss
from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram
from nemo_kd.data.tokenization import ConversationTokenizer
from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
from nemo_kd.losses.kd import KDSettings, topk_kd_loss

PIECES = [
    "The quick brown fox jumps over the lazy dog. ", "What is 12 plus 30? The answer is 42.\n",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}\n", "Unicode: café, naïve, ß, Ω ≈ ∑. ",
    "日本語のテキストと中文混合. ", "emoji 🙂🚀 👨‍👩‍👧 🇫🇷 ", "numbers 3.14159 2718 -42 1e-9\n", "  spaced   out\t\ttabs\n\n",
]


def _corpus(n=400, seed=0):
    rnd = random.Random(seed)
    return ["".join(rnd.choice(PIECES) for _ in range(8)) for _ in range(n)]


def _timeit(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tok-vocab", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    corpus = _corpus()
    student_tok = train_byte_level_bpe(corpus, vocab_size=args.tok_vocab, template="chatml")
    teacher_tok = train_sentencepiece_unigram(corpus, vocab_size=args.tok_vocab)
    s_ct = ConversationTokenizer(student_tok, max_seq_length=4 * args.tokens)
    t_ct = ConversationTokenizer(teacher_tok, max_seq_length=8 * args.tokens)
    rnd = random.Random(1)
    convs = []
    for _ in range(args.samples):
        text = ""
        while len(student_tok(text, add_special_tokens=False)["input_ids"]) < args.tokens:
            text += "".join(rnd.choice(PIECES) for _ in range(64))
        ids = student_tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
        text = student_tok.decode(ids)
        convs.append([{"role": "user", "content": "Write something long."}, {"role": "assistant", "content": text}])

    t0 = time.perf_counter()
    pairs = [(s_ct(m), t_ct(m)) for m in convs]
    t_tok = time.perf_counter() - t0
    contents = [[m[-1]["content"]] for m in convs]
    t0 = time.perf_counter()
    groups = [align_samples(s, t, student_tok, teacher_tok, c) for (s, t), c in zip(pairs, contents)]
    t_align = time.perf_counter() - t0
    n_s = np.mean([g.num_student_tokens for g in groups])
    n_t = np.mean([g.num_teacher_tokens for g in groups])
    f11 = np.mean([g.fraction_one_to_one for g in groups])
    print(f"samples: {args.samples}, student completion tokens/sample {n_s:.0f}, teacher {n_t:.0f}, "
          f"one-to-one fraction {f11:.3f}")
    print(f"render+tokenise (both sides): {args.samples / t_tok:8.1f} samples/s")
    print(f"alignment (spans + groups):   {args.samples / t_align:8.1f} samples/s "
          f"({1e3 * t_align / args.samples:.2f} ms/sample)")

    # ---- loss overhead per step: one 4k-token sample as a [N, V] step
    vm = build_vocab_map(student_tok, teacher_tok, student_vocab_size=args.vocab, teacher_vocab_size=args.vocab)
    (s, t), g = pairs[0], groups[0]
    s_comp, t_comp = s.input_ids[s.num_prompt_tokens:], t.input_ids[t.num_prompt_tokens:]
    n, nt = len(s.input_ids), len(t_comp)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, args.vocab, generator=gen, requires_grad=True)
    tfull = torch.randn(nt, args.vocab, generator=gen)
    tz, ti = tfull.topk(args.k, -1)
    lse = torch.logsumexp(tfull, -1)
    t_tgt = torch.log_softmax(tfull, -1)[torch.arange(nt), torch.tensor(t_comp)]
    same_z, same_i = torch.randn(n, args.k, generator=gen), torch.randint(0, args.vocab, (n, args.k), generator=gen)
    same_lse = torch.logsumexp(torch.randn(n, 64, generator=gen), -1) + 5

    def build():
        return build_cross_tokenizer_batch([g], [s_comp], [t_comp], vm, [s.num_prompt_tokens - 1], [0])

    batch = build()
    print(f"loss step: N={n} student rows, V={args.vocab}, k={args.k}, chain groups {batch.num_chain_groups}")
    for conv in ("renormalized", "exact_tail"):
        def same():
            topk_kd_loss(logits, same_z, same_i, KDSettings(topk_convention=conv),
                         teacher_lse=same_lse).sum().backward()

        def cross():
            cross_tokenizer_kd_loss(logits, tz, ti, build(), vm, KDSettings(topk_convention=conv), teacher_lse=lse,
                                    teacher_target_logprobs=t_tgt).per_token.sum().backward()

        ts, tc = _timeit(same, 3), _timeit(cross, 3)
        print(f"  {conv:12s}: same-tokenizer {1e3 * ts:7.1f} ms, cross-tokenizer {1e3 * tc:7.1f} ms "
              f"(overhead {100 * (tc / ts - 1):+.0f}%, incl. batch index build {1e3 * _timeit(build, 3):.2f} ms)")


if __name__ == "__main__":
    main()
