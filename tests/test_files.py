import gzip

import pytest

from lightning_efficient import DataError
from lightning_efficient.data.files import (
    embedded_path,
    read_column,
    read_numbered_records,
    read_records,
    read_texts,
    split_indices,
)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl_gz", "csv"])
def test_table_formats_read_the_same_rows(user_files, fmt):
    rows = read_records(user_files[fmt])
    reference = read_records(user_files["jsonl"])
    assert [r["sentence"] for r in rows] == [r["sentence"] for r in reference]
    assert [r["category"] for r in rows] == [r["category"] for r in reference]


def test_txt_gives_one_text_per_non_empty_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\n\n  second line  \n", encoding="utf-8")
    assert read_records(path, "body") == [{"body": "first line"}, {"body": "second line"}]


def test_embedded_files_ship_with_the_package():
    assert len(read_records(embedded_path("austen.txt.gz"))) > 60000
    assert len(read_records(embedded_path("bible_en_fr.jsonl.gz"))) == 31102


BAD_FILES = {  # what is wrong: (file name, its bytes or None for no file, the error's words)
    "missing": ("nope.jsonl", None, r"nope\.jsonl' does not exist"),
    "unreadable": ("broken.jsonl.gz", b"this is not gzip", r"broken\.jsonl\.gz' cannot be read"),
    "invalid JSON line": ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad\.jsonl', line 2: not valid JSON"),
    "unsupported suffix": (
        "data.parquet",
        b"x",
        r"unsupported format '\.parquet'; allowed: \.jsonl, \.json, \.csv, \.txt",
    ),
    "empty": ("empty.csv.gz", gzip.compress(b""), "holds no rows"),
}


@pytest.mark.parametrize("wrong", sorted(BAD_FILES))
def test_bad_file_is_named_with_what_is_wrong(tmp_path, wrong):
    name, content, message = BAD_FILES[wrong]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_read_texts_takes_one_column_of_every_file_in_order(user_files):
    sentences = [row["sentence"] for row in read_records(user_files["jsonl"])]
    assert read_texts([user_files["jsonl"], user_files["txt"]], "sentence") == sentences + sentences
    with pytest.raises(DataError, match=r"column 'text' is not in data file .*sentences\.csv"):
        read_texts([user_files["csv"]], "text")


def test_missing_column_lists_available(user_files):
    rows = read_records(user_files["csv"])
    with pytest.raises(
        DataError, match=r"column 'label' is not in data file .*available columns: category, sentence, source_doc"
    ):
        read_column(rows, "label", user_files["csv"])


def test_split_is_seeded_disjoint_and_sized():
    rest, val, test = split_indices(100, [0.1, 0.2], seed=3)
    assert (len(rest), len(val), len(test)) == (70, 10, 20)
    assert sorted(rest + val + test) == list(range(100))
    assert split_indices(100, [0.1, 0.2], seed=3) == [rest, val, test]
    assert split_indices(100, [0.1, 0.2], seed=4) != [rest, val, test]


def test_split_keeps_groups_together():
    groups = [i // 10 for i in range(200)]  # 20 groups of 10
    rest, val = split_indices(200, [0.25], seed=0, groups=groups)
    assert len(val) == 50
    assert not {groups[i] for i in rest} & {groups[i] for i in val}


def test_split_rejects_bad_fractions():
    with pytest.raises(DataError, match=r"must each lie in \[0, 1\) and sum to less than 1"):
        split_indices(10, [0.6, 0.5], seed=0)


def test_numbered_records_carry_their_line_numbers(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two"}\n\n\n{"label": 1}\n')
    assert [line for line, _ in read_numbered_records(jsonl)] == [1, 3, 6]
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('text,label\none,1\n"two\nlines",0\nthree,1\n')
    assert [(line, row["text"]) for line, row in read_numbered_records(csv_file)] == [
        (2, "one"),
        (4, "two\nlines"),
        (5, "three"),
    ]
    txt = tmp_path / "a.txt"
    txt.write_text("\nfirst\n\nsecond\n")
    assert read_numbered_records(txt, "body") == [(2, {"body": "first"}), (4, {"body": "second"})]


def test_missing_column_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n\n\n{"label": 1}\n')
    numbered = read_numbered_records(path)
    records, lines = [r for _, r in numbered], [n for n, _ in numbered]
    with pytest.raises(
        DataError, match=r"column 'text' is not in data file .*a\.jsonl' \(line 6\); available columns: label"
    ):
        read_column(records, "text", str(path), lines)
    with pytest.raises(DataError, match=r"\(row 3\)"):  # without line numbers: the row's position
        read_column(records, "text", str(path))


@pytest.mark.parametrize(("n", "fractions", "seed"), [(10, [0.2], 0), (1000, [0.02, 0.02], 3), (57, [0.0, 0.1], 1)])
def test_the_vectorised_split_equals_the_split_of_one_item_groups(n, fractions, seed):
    assert split_indices(n, fractions, seed) == split_indices(n, fractions, seed, groups=list(range(n)))
