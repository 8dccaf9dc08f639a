#!/usr/bin/env python3
"""Write data/tests/fixtures/wds-000000.tar with the Python `webdataset` ShardWriter.

The fixture pins the exact layout real LAION-style shards have (img2dataset and
`webdataset.ShardWriter`: `{key}.jpg`, `{key}.txt`, `{key}.json` members, POSIX tar).
Run with the repository's venv:  .venv/bin/python scripts/gen-webdataset-fixture.py
"""
import io
import json
import os

import webdataset as wds
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data", "tests", "fixtures")

CAPTIONS = ["a red square", "a green square", "a blue square", "", "a grey square"]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (128, 128, 128)]


def jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main():
    os.makedirs(OUT, exist_ok=True)
    pattern = os.path.join(OUT, "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=100, verbose=0) as sink:
        for i, (caption, color) in enumerate(zip(CAPTIONS, COLORS)):
            sink.write({
                "__key__": f"{i:09d}",
                "jpg": jpeg(color),
                "txt": caption,
                "json": json.dumps({"caption": caption, "key": f"{i:09d}", "width": 4, "height": 4}),
            })


if __name__ == "__main__":
    main()
