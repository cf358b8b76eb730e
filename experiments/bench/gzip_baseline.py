"""Bits per byte that `gzip -9` (zlib level 9) takes on a corpus's validation split: the bar the
default job's held-out loss is compared with.

Reads the same split `jaxlm eval` scores (`open_source(dataset, "validation")`) and compresses it
two ways: every document alone (no context shared between documents, as the model sees them) and
all documents concatenated (gzip's 32 KiB window then spans document boundaries). Prints one JSON
object.

    python experiments/bench/gzip_baseline.py [--dataset stdlib]
"""

from __future__ import annotations

import argparse
import json
import zlib

from jaxlm.data import open_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="stdlib")
    args = parser.parse_args()
    source = open_source(args.dataset, "validation")
    docs = [source[i].encode("utf-8", errors="surrogateescape") for i in range(len(source))]
    raw = sum(map(len, docs))
    alone = sum(len(zlib.compress(d, 9)) for d in docs)
    joined = len(zlib.compress(b"".join(docs), 9))
    print(
        json.dumps(
            {
                "dataset": source.description,
                "documents": len(docs),
                "bytes": raw,
                "bits_per_byte_per_document": round(8 * alone / raw, 4),
                "bits_per_byte_concatenated": round(8 * joined / raw, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
