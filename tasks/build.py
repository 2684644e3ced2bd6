"""Rebuild the offline task files in this folder from the licensed originals (checked by sha256).

Usage: python tasks/build.py [SOURCE_DIR]   (default ../shared/data/tasks next to the repository)

Each output is gzip-compressed JSONL holding the fields lm-eval's own task reads from its Hugging Face
dataset, so the task YAMLs here differ from lm-eval's only in where the data comes from:
PIQA gets `label` from valid-labels.lst (by line), BoolQ gets SuperGLUE's `label` (0/1) and `idx`;
LAMBADA and WinoGrande are unchanged; HellaSwag is only available in a derived text form and becomes
`hellaswag_text` with lm-eval's `query` / `choices` / `label` fields (see README.md).
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHA256 = {
    "lambada_openai/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "winogrande/dev.jsonl": "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8",
    "boolq/dev.jsonl": "ebc29ea3808c5c611672384b3de56e83349fe38fc1fe876fd29b674d81d0a80a",
    "hellaswag/fallback_derived_klosax/hellaswag_val_full.txt.bz2":
        "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
}


def read_checked(src: Path, rel: str) -> bytes:
    """The original file's bytes, refused unless its sha256 matches the pin."""
    data = (src / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != SHA256[rel]:
        sys.exit(f"build.py: {src / rel} does not match its sha256 pin")
    return data


def lines(data: bytes) -> list[str]:
    return data.decode("utf-8").splitlines()


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    """Deterministic gzip (no timestamp or name in the header) so rebuilding gives the same bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text)
    print(f"{path.relative_to(HERE)}: {len(rows)} rows")


def clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow artifact cleaning as lm-eval applies it: title tags to '. ', other tags out."""
    import re

    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_rows(data: bytes) -> list[dict]:
    """Six lines per item: 'activity_label: ctx', gold index, four endings."""
    text = lines(bz2.decompress(data))
    rows = []
    for i in range(0, len(text) - len(text) % 6, 6):
        rows.append({"query": clean_hellaswag(text[i]), "choices": [clean_hellaswag(e) for e in text[i + 2: i + 6]],
                     "label": int(text[i + 1])})
    return rows


def main(src: Path) -> None:
    lambada = [json.loads(x) for x in lines(read_checked(src, "lambada_openai/lambada_test.jsonl"))]
    write_jsonl_gz(HERE / "lambada_openai" / "lambada_test.jsonl.gz", lambada)

    piqa = [json.loads(x) for x in lines(read_checked(src, "piqa/valid.jsonl"))]
    labels = [int(x) for x in lines(read_checked(src, "piqa/valid-labels.lst"))]
    assert len(piqa) == len(labels)
    write_jsonl_gz(HERE / "piqa" / "valid.jsonl.gz", [{**d, "label": y} for d, y in zip(piqa, labels)])

    wino = [json.loads(x) for x in lines(read_checked(src, "winogrande/dev.jsonl"))]
    write_jsonl_gz(HERE / "winogrande" / "dev.jsonl.gz", wino)

    boolq = [json.loads(x) for x in lines(read_checked(src, "boolq/dev.jsonl"))]
    write_jsonl_gz(HERE / "boolq" / "dev.jsonl.gz",
                   [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
                    for i, d in enumerate(boolq)])

    hs = hellaswag_rows(read_checked(src, "hellaswag/fallback_derived_klosax/hellaswag_val_full.txt.bz2"))
    write_jsonl_gz(HERE / "hellaswag_text" / "hellaswag_val_text.jsonl.gz", hs)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data" / "tasks")
