import pytest

from dpolens.data import (DataError, balanced_sample, load_f1_set, load_labelled, load_pairs,
                          load_prompts, load_wikitext)


def test_prompt_errors_name_file_line_field(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt' must be a string"):
        load_prompts(p)
    p.write_text('{"prompt": "ok"}\n{bad json\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: bad JSON"):
        load_prompts(p)
    p.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'prompt' is empty"):
        load_prompts(p)
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid UTF-8"):
        load_prompts(p)
    assert load_prompts(p, skip_bad_rows=True) == ["ok"]


def test_rtp_nested_prompt_and_f1(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": {"text": "nested"}}\n')
    assert load_prompts(p) == ["nested"]
    f = tmp_path / "f.jsonl"
    f.write_text('{"prompt": "a", "gold": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match="f.jsonl:2: missing field 'gold'"):
        load_f1_set(f)


def test_pairs_empty_or_identical_sides(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(
        '{"prompt_text": "a", "unpert_gen_text": "good", "pert_gen_text": "bad"}\n'
        '{"prompt_text": "b", "unpert_gen_text": "same", "pert_gen_text": "same"}\n'
        '{"prompt_text": "c", "unpert_gen_text": "", "pert_gen_text": "bad"}\n')
    with pytest.raises(DataError, match="pairs.jsonl:2: identical preferred and dispreferred sides"):
        load_pairs(p)
    assert len(load_pairs(p, skip_bad_rows=True)) == 1
    p.write_text('{"prompt_text": "b", "unpert_gen_text": "same", "pert_gen_text": "same"}\n')
    with pytest.raises(DataError, match="no usable preference pairs"):
        load_pairs(p, skip_bad_rows=True)


def test_shared_corpora(shared):
    d = load_labelled(shared / "data/toxic-corpora/davidson_labeled_data.csv")
    o = load_labelled(shared / "data/toxic-corpora/olid-training-v1.0.tsv")
    assert len(d) == 24783 and len(o) == 13240
    assert 0.7 < sum(l for _, l in d) / len(d) < 0.9  # Davidson is mostly offensive
    assert 0.2 < sum(l for _, l in o) / len(o) < 0.5
    assert len(load_prompts(shared / "data/rtp/challenge_prompts.jsonl")) == 1199
    assert len(load_f1_set(shared / "data/wiki/wiki_samples.jsonl")) == 2064
    raw = load_wikitext(str(shared / "data/wikitext-2-raw/wiki.test.raw"))
    assert len(raw) == 2891
    assert len(load_wikitext(str(shared / "data/wikitext-2-raw/wikitext-2-raw-v1-validation.parquet"))) == 2461


def test_balanced_sample_and_one_class():
    ex = [("t", 1)] * 30 + [("n", 0)] * 10
    s = balanced_sample(ex, None, True, 0)
    assert sum(l for _, l in s) == 10 and len(s) == 20
    with pytest.raises(DataError, match="one class only"):
        balanced_sample([("t", 1)] * 5, None, True, 0)


def test_missing_shared_folder_message(tmp_path):
    with pytest.raises(DataError, match="offline data folder"):
        load_prompts(tmp_path / "shared" / "data" / "x.jsonl")
