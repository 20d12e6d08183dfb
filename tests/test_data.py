"""load_documents on small local files of every supported format."""

from __future__ import annotations

import gzip
import json

import pytest

from saelib.data import load_documents

GSM8K = [
    {"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_gsm8k_records_get_answer_start(tmp_path):
    documents = load_documents(str(_write_jsonl(tmp_path / "qa.jsonl", GSM8K)))
    assert len(documents) == 2
    for document, record in zip(documents, GSM8K, strict=True):
        assert document.text.startswith(f"Question: {record['question']}")
        assert document.text[: document.answer_start].endswith("Answer:")
        assert document.text[document.answer_start :].strip() == record["answer"]


def test_nested_doc_records_and_gzip(tmp_path):
    """The embedded GSM8K file is gzipped jsonl with each problem under "doc"."""
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in GSM8K:
            handle.write(json.dumps({"doc": record, "other": 1}) + "\n\n")
    documents = load_documents(str(path), limit=1)
    assert len(documents) == 1
    assert documents[0].text[documents[0].answer_start :].strip() == GSM8K[0]["answer"]


def test_json_dict_of_wiki_summaries(tmp_path):
    data = {"a": {"extract": "Paris is a city.", "topic": "geo"}, "b": {"text": "Plain."}}
    (tmp_path / "wiki.json").write_text(json.dumps(data))
    documents = load_documents(str(tmp_path / "wiki.json"))
    assert [(doc.text, doc.label, doc.answer_start) for doc in documents] == [
        ("Paris is a city.", "geo", None),
        ("Plain.", None, None),
    ]


def test_json_list_and_limit(tmp_path):
    records = [{"text": f"doc {i}", "label": str(i)} for i in range(5)]
    (tmp_path / "docs.json").write_text(json.dumps(records))
    documents = load_documents(str(tmp_path / "docs.json"), limit=3)
    assert [doc.text for doc in documents] == ["doc 0", "doc 1", "doc 2"]
    assert documents[2].label == "2"


def test_txt_paragraphs(tmp_path):
    (tmp_path / "notes.txt").write_text("First paragraph\nstill first.\n\n\n\n  Second.  \n")
    documents = load_documents(str(tmp_path / "notes.txt"))
    assert [doc.text for doc in documents] == ["First paragraph\nstill first.", "Second."]


def test_unknown_record_format_names_fields(tmp_path):
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "hi", "completion": "there"}])
    with pytest.raises(ValueError, match="text, extract, question\\+answer") as error:
        load_documents(str(path))
    assert "'completion', 'prompt'" in str(error.value)


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_documents("./no/such/file.txt")


def test_unsupported_suffix_and_empty_file(tmp_path):
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_documents(str(tmp_path / "table.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(str(tmp_path / "empty.jsonl"))
