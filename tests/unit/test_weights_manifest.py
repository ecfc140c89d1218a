"""Shipped weights change only by release: every shipped file matches ``MANIFEST.json``.

A training phase that overwrote ``engine/models/weights/`` (and so re-committed 20 MB) fails
here until the manifest is updated on purpose, in the release commit that also updates the
model card. Weights are fp16 safetensors: small, loadable without pickle, no LFS needed.
"""

from __future__ import annotations

import hashlib
import json

from engine.models.registry import WEIGHTS_DIR


def test_every_shipped_file_is_in_the_manifest_with_its_hash():
    manifest = json.loads((WEIGHTS_DIR / "MANIFEST.json").read_text())["files"]
    shipped = {str(p.relative_to(WEIGHTS_DIR)) for p in WEIGHTS_DIR.rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != "MANIFEST.json"}
    assert shipped == set(manifest)
    for name, entry in manifest.items():
        data = (WEIGHTS_DIR / name).read_bytes()
        assert len(data) == entry["bytes"], name
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], f"{name} changed without a release"
