"""Input records: validation errors name file:line and reason; skip mode; HF datasets; content hash."""

import json

import pytest

from nemo_kd.data.records import DataError, read_records

GOOD_PAIR = {"id": "a", "prompt": "What is 2+2?", "response": "4"}
GOOD_CHAT = {
    "id": 7,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
        {"role": "assistant", "content": "soon."},
    ],
}


def _write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
            f.write(b"\n")
    return str(path)


def test_prompt_response_and_chat(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [GOOD_PAIR, "", GOOD_CHAT, {"prompt": "", "response": " ok"}])
    rs = read_records(path)
    assert len(rs) == 3 and rs.skipped == []
    r0, r1, r2 = rs
    assert (r0.index, r0.id, r0.source_file, r0.source_line) == (0, "a", path, 1)
    assert r0.messages == ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"})
    assert (r0.prompt_text, r0.completion_text) == ("What is 2+2?", "4")
    # Trailing assistant turns are the completion; earlier ones belong to the prompt.
    assert (r1.index, r1.id, r1.source_line) == (1, 7, 3)
    assert [m["content"] for m in r1.completion_messages] == ["See you", "soon."]
    assert r1.completion_text == "See you\nsoon."
    assert r1.prompt_messages[-1] == {"role": "user", "content": "Bye"}
    assert r2.id is None and r2.prompt_text == "" and r2.completion_text == " ok"  # raw text kept verbatim


BAD_CASES = [
    ('{"prompt": "x", "response": ', "bad JSON"),
    ('["not", "an", "object"]', "wrong type for sample"),
    ({"prompt": "x"}, "missing field 'response'"),
    ({"response": "x"}, "missing field 'prompt'"),
    ({"text": "x"}, "missing field"),
    ({"prompt": 3, "response": "x"}, "wrong type for field 'prompt'"),
    ({"prompt": "x", "response": ["y"]}, "wrong type for field 'response'"),
    ({"id": 1.5, "prompt": "x", "response": "y"}, "wrong type for field 'id'"),
    ({"prompt": "x", "response": "   "}, "empty completion"),
    ({"messages": "hi"}, "wrong type for field 'messages'"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user"}]}, "missing field 'messages[0].content'"),
    ({"messages": [{"role": "user", "content": 5}]}, "wrong type for messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "invalid role 'wizard'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, "no assistant turn at the end"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty completion"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "bad UTF-8"),
]


@pytest.mark.parametrize("bad,reason", BAD_CASES, ids=[r for _, r in BAD_CASES])
def test_malformed_sample_names_file_line_reason(tmp_path, bad, reason):
    path = _write_lines(tmp_path / "bad.jsonl", [GOOD_PAIR, GOOD_CHAT, bad, GOOD_PAIR])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert (err.value.file, err.value.line) == (path, 3)
    assert str(err.value).startswith(f"{path}:3: ")
    assert reason in str(err.value)


def test_skip_bad_samples_reports(tmp_path):
    lines = [GOOD_PAIR, b"\xff\xfe garbage", "{nope", GOOD_CHAT, {"prompt": "x", "response": ""}, GOOD_PAIR]
    path = _write_lines(tmp_path / "mixed.jsonl", lines)
    rs = read_records(path, skip_bad_samples=True)
    assert [r.source_line for r in rs] == [1, 4, 6]
    assert [r.index for r in rs] == [0, 1, 2]  # indices are contiguous over kept samples
    assert [(s.file, s.line) for s in rs.skipped] == [(path, 2), (path, 3), (path, 5)]
    assert ["bad UTF-8" in rs.skipped[0].reason, "bad JSON" in rs.skipped[1].reason, "empty completion" in rs.skipped[2].reason] == [True] * 3
    report = rs.skipped_report()
    assert "skipped 3" in report and f"{path}:3: bad JSON" in report


def test_hf_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    pair_rows = [GOOD_PAIR, {"id": "b", "prompt": "p2", "response": "r2"}]
    path = _write_lines(tmp_path / "pairs.jsonl", pair_rows)
    ds_dir = str(tmp_path / "pairs_ds")
    datasets.Dataset.from_list(pair_rows).save_to_disk(ds_dir)
    from_jsonl, from_hf = read_records(path), read_records(ds_dir)
    assert [r.messages for r in from_hf] == [r.messages for r in from_jsonl]
    assert [r.id for r in from_hf] == ["a", "b"]
    assert from_hf.content_hash == from_jsonl.content_hash

    chat_dir = str(tmp_path / "chat_ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD_CHAT])}).save_to_disk(chat_dir)
    chat = read_records(chat_dir)
    assert chat[0].messages == tuple(GOOD_CHAT["messages"]) and chat[0].id == 7

    bad_dir = str(tmp_path / "bad_ds")
    datasets.Dataset.from_list([GOOD_PAIR, {"id": "c", "prompt": "p", "response": ""}]).save_to_disk(bad_dir)
    with pytest.raises(DataError, match=r"bad_ds:2: empty completion"):
        read_records(bad_dir)
    assert len(read_records(bad_dir, skip_bad_samples=True)) == 1


def test_content_hash_is_stable_and_content_sensitive(tmp_path):
    a = _write_lines(tmp_path / "a.jsonl", [GOOD_PAIR, GOOD_CHAT])
    # Same content, different key order / whitespace / file name / blank lines: same hash.
    b = _write_lines(
        tmp_path / "b.jsonl",
        [json.dumps({"response": "4", "id": "a", "prompt": "What is 2+2?"}, indent=None, separators=(" , ", " : ")), "", GOOD_CHAT],
    )
    h = read_records(a).content_hash
    assert h.startswith("sha256:") and h == read_records(b).content_hash
    for changed in (
        [dict(GOOD_PAIR, response="5"), GOOD_CHAT],
        [dict(GOOD_PAIR, id="z"), GOOD_CHAT],
        [GOOD_CHAT, GOOD_PAIR],
        [GOOD_PAIR],
    ):
        assert read_records(_write_lines(tmp_path / "c.jsonl", changed)).content_hash != h


def test_preference_pairs_become_consecutive_chosen_rejected_records(tmp_path):
    chat_prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = _write_lines(tmp_path / "pairs.jsonl", [
        {"id": "p", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"messages": chat_prompt, "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Go away"},
    ])
    rs = read_records(path)
    assert len(rs) == 4 and rs.num_pairs == 2 and rs.is_preference
    assert [(r.index, r.role, r.pair, r.source_line) for r in rs] == [
        (0, "chosen", 0, 1), (1, "rejected", 0, 1), (2, "chosen", 1, 2), (3, "rejected", 1, 2)]
    assert rs[0].messages == ({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"})
    assert rs[3].messages == (*chat_prompt, {"role": "assistant", "content": "Go away"})
    assert rs[3].prompt_messages == tuple(chat_prompt) and rs[3].completion_text == "Go away"
    # The role is part of the content hash; plain samples hash as before (no role key).
    swapped = read_records(_write_lines(tmp_path / "swapped.jsonl", [
        {"id": "p", "prompt": "2+2?", "chosen": "5", "rejected": "4"},
        {"messages": chat_prompt, "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Go away"}]))
    assert swapped.content_hash != rs.content_hash
    single = read_records(_write_lines(tmp_path / "single.jsonl", [GOOD_PAIR]))
    assert single[0].role == "single" and single[0].pair == -1 and not single.is_preference
    assert "role" not in single[0].canonical()


@pytest.mark.parametrize("obj, reason", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "empty 'rejected' response"),
    ({"prompt": "q", "response": "r", "chosen": "a", "rejected": "b"}, "ambiguous sample"),
    ({"chosen": "a", "rejected": "b"}, "needs 'prompt' or 'messages'"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "wrong type for field 'chosen'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "chosen": "a", "rejected": "b"}, "must hold only assistant turns"),
])
def test_malformed_pairs_name_file_and_line(tmp_path, obj, reason):
    path = _write_lines(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, obj])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert e.value.line == 2 and reason in e.value.reason, str(e.value)
    rs = read_records(path, skip_bad_samples=True)  # the good pair survives whole
    assert len(rs) == 2 and rs.num_pairs == 1 and len(rs.skipped) == 1


def test_lone_surrogates_are_a_data_error_that_skip_bad_samples_can_skip(tmp_path):
    """JSON's "\\ud800" escape decodes to a lone surrogate, which no tokenizer can encode: refused with file:line
    and field before it reaches one; with skip_bad_samples the sample is dropped and named, the rest kept."""
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": "fine", "response": "ok"}),
             '{"prompt": "fine", "response": "a\\ud800"}',  # what json.dumps writes for a lone surrogate
             json.dumps({"messages": [{"role": "user", "content": "q\udfff"}, {"role": "assistant", "content": "a"}]}),
             json.dumps({"prompt": "emoji \U0001F600 is fine", "response": "\u00e9"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: unencodable text in field 'response': \\ud800 at character 1"):
        read_records(path)
    rs = read_records(path, skip_bad_samples=True)
    assert [r.source_line for r in rs] == [1, 4]
    assert [(s.line, s.reason) for s in rs.skipped] == [
        (2, "unencodable text in field 'response': \\ud800 at character 1 (surrogates not allowed)"),
        (3, "unencodable text in messages[0].content: \\udfff at character 1 (surrogates not allowed)")]
    assert len(rs) + len(rs.skipped) == len(lines)
