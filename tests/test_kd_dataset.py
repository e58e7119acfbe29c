"""Collate (label shift, teacher rows at label positions) and the resumable global-batch sampler."""

import numpy as np
import pytest
import torch

from nemo_kd.data.kd_dataset import DataConfigError, DistillationSample, GlobalBatchSampler, collate
from nemo_kd.teacher.store import TeacherTopK


def _sample(index, ids, mask, k=2):
    n = int(sum(mask))
    vals = torch.arange(n * k, dtype=torch.float32).reshape(n, k) + 100 * index
    return DistillationSample(index, np.array(ids), np.array(mask, dtype=np.int8),
                              TeacherTopK(index, vals, torch.full((n, k), 7), torch.arange(n, dtype=torch.float32), -3.5))


def test_collate_shifts_labels_and_places_teacher_rows():
    # tokens: prompt 10 11, completion 12 13 14 (mask on the completion tokens themselves)
    s = _sample(0, [10, 11, 12, 13, 14], [0, 0, 1, 1, 1])
    b = collate([s, _sample(1, [20, 21, 22], [0, 1, 1])], seq_length=6, pad_id=0)
    assert b["inputs"][0].tolist() == [10, 11, 12, 13, 14, 0]
    assert b["labels"][0].tolist() == [11, 12, 13, 14, 0, 0]
    # label t is token t+1: the completion tokens 12,13,14 are labels at positions 1,2,3
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 0]
    # the store's r-th row goes to the r-th completion label
    assert b["teacher_values"][0, 1].tolist() == [0.0, 1.0] and b["teacher_values"][0, 3].tolist() == [4.0, 5.0]
    assert torch.isinf(b["teacher_values"][0, 0]).all() and torch.isinf(b["teacher_values"][0, 4]).all()
    assert b["teacher_lse"][0].tolist() == [0, 0, 1, 2, 0, 0]
    assert b["loss_mask"][1].tolist() == [1, 1, 0, 0, 0, 0]
    assert b["teacher_seq_logprob"].tolist() == [-3.5, -3.5]


def test_collate_rejects_store_length_mismatch_and_overlong():
    bad = _sample(3, [1, 2, 3], [0, 1, 1])
    bad.loss_mask = np.array([0, 0, 1], dtype=np.int8)
    with pytest.raises(DataConfigError, match="sample 3: 1 completion tokens but the teacher store has 2 rows"):
        collate([bad], seq_length=4, pad_id=0)
    with pytest.raises(DataConfigError, match="sample 4 has 9 tokens"):
        collate([_sample(4, list(range(9)), [0] * 4 + [1] * 5)], seq_length=4, pad_id=0)


def test_sampler_partitions_global_batches_and_resumes():
    n, micro, gbs, dp = 20, 2, 8, 2
    ranks = [iter(GlobalBatchSampler(n, micro, gbs, r, dp, seed=3)) for r in range(dp)]
    steps = [[next(it) for it in ranks] for _ in range(5)]  # 2 steps per epoch (4 samples dropped)
    for step in steps:
        flat = [i for rank in step for mb in rank for i in mb]
        assert len(flat) == gbs == len(set(flat))
        assert all(len(mb) == micro for rank in step for mb in rank)
    epoch0 = {i for step in steps[:2] for rank in step for mb in rank for i in mb}
    assert len(epoch0) == 16  # no sample twice within an epoch
    resumed = iter(GlobalBatchSampler(n, micro, gbs, 1, dp, seed=3, consumed_samples=3 * gbs))
    assert next(resumed) == steps[3][1] and next(resumed) == steps[4][1]
    with pytest.raises(DataConfigError, match="multiple of micro_batch_size"):
        GlobalBatchSampler(n, 3, gbs, 0, dp)


def test_sampler_keeps_pairs_together_and_collate_marks_roles():
    n, micro, gbs, dp = 24, 4, 8, 2
    for epoch_step in range(6):  # 3 steps per epoch: two epochs
        for r in range(dp):
            it = iter(GlobalBatchSampler(n, micro, gbs, r, dp, seed=5, group_size=2, consumed_samples=epoch_step * gbs))
            for mb in next(it):
                assert all(mb[i] % 2 == 0 and mb[i + 1] == mb[i] + 1 for i in range(0, micro, 2)), mb
    # group_size=1 keeps the historical order (resuming old runs is unchanged)
    plain = np.random.default_rng(5).permutation(n)
    assert GlobalBatchSampler(n, micro, gbs, seed=5)._order(0).tolist() == plain.tolist()
    with pytest.raises(DataConfigError, match="multiple of 2"):
        GlobalBatchSampler(n, 3, 6, group_size=2)
    chosen = DistillationSample(0, np.array([1, 2, 3]), np.array([0, 1, 1], dtype=np.int8), role="chosen", pair=4)
    rejected = DistillationSample(1, np.array([1, 2, 5, 6]), np.array([0, 1, 1, 1], dtype=np.int8), role="rejected",
                                  pair=4)
    b = collate([chosen, rejected], seq_length=5, pad_id=0)
    assert b["roles"].tolist() == [1, 2] and b["pair_ids"].tolist() == [4, 4]  # ROLE_POSITIVE, ROLE_NEGATIVE
    assert "roles" not in collate([_sample(0, [1, 2, 3], [0, 1, 1])], seq_length=5, pad_id=0)


def test_overlong_side_drops_the_whole_pair(tmp_path):
    import json

    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.data.records import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe

    tok = train_byte_level_bpe(["short answer long answer " * 4], vocab_size=280, save_dir=str(tmp_path / "tok"))
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "q", "chosen": "short", "rejected": "long answer " * 30},
            {"prompt": "q", "chosen": "short", "rejected": "short answer"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = DistillationDataset(read_records(str(path)), ConversationTokenizer(tok, "chat", 40, overlong="drop"))
    assert ds.dropped_pairs == 1 and ds.group_size == 2 and len(ds) == 2
    assert [(ds[i].role, ds[i].pair) for i in range(2)] == [("chosen", 1), ("rejected", 1)]
