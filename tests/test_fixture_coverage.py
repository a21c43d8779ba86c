"""Every file of the fixture set is checked by some parity test, and every tensor is as the manifest says.

The map below names, for each fixture file pattern, the test module that compares against it. A fixture set
with a file no pattern covers fails here, so new fixture files cannot be silently ignored.
"""

from __future__ import annotations

import fnmatch
import json

import torch

COVERAGE = {
    "FIXTURES.md": "documentation",
    "generation_log.json": "seeds, read by tests/test_lm.py",
    "tensor_manifest.json": "this file",
    "audio/*": "tests/test_audio.py",
    "tokenizer/*": "tests/test_text.py",
    "tokenizer/CosyVoice-BlankEN/*": "tests/test_text.py",
    "llm_small/*": "tests/test_lm.py",
    "flow_small/*": "tests/test_flow.py",
    "hift_small/*": "tests/test_hift.py",
    "pipeline_small/*": "tests/test_pipeline.py",
    "e2e_small/*.wav": "tests/test_e2e.py, tests/test_audio.py",
    "e2e_small/frontend.pt": "tests/test_e2e.py, tests/test_audio.py",
    "e2e_small/meta.json": "tests/test_e2e.py",
    "e2e_small/model/*": "tests/test_e2e.py (loaded as a user's model directory)",
    "e2e_small/model/CosyVoice-BlankEN/*": "tests/test_e2e.py",
    "e2e_small/*/inputs.json": "tests/test_e2e.py",
    "e2e_small/*/meta.json": "tests/test_e2e.py",
    "e2e_small/*/model_input.pt": "tests/test_e2e.py",
    "e2e_small/*/outputs.pt": "tests/test_e2e.py",
    "e2e_small/zero_shot_spk/spk2info.pt": "tests/test_e2e.py",
}


def test_every_fixture_file_is_covered(fixtures):
    uncovered = []
    # Files, and links that do not lead to a folder (a broken link is reported too).
    for path in sorted(p for p in fixtures.rglob("*") if p.is_file() or (p.is_symlink() and not p.is_dir())):
        rel = path.relative_to(fixtures).as_posix()
        if not any(fnmatch.fnmatchcase(rel, pat) and rel.count("/") == pat.count("/") for pat in COVERAGE):
            uncovered.append(rel)
    assert not uncovered, f"fixture files no parity test covers: {uncovered}"


def test_tensor_manifest_matches_files(fixtures):
    manifest = json.loads((fixtures / "tensor_manifest.json").read_text())
    checked = 0
    for rel, tensors in manifest.items():
        path = fixtures / rel
        if not isinstance(tensors, dict) or not path.is_file():
            continue
        data = torch.load(path, map_location="cpu", weights_only=True)
        flat = {f"{k}.{n}": t for k, v in data.items() if isinstance(v, dict) for n, t in v.items()}
        flat.update({k: v for k, v in data.items() if isinstance(v, torch.Tensor)})
        for name, spec in tensors.items():
            if name in flat and isinstance(spec, dict) and "shape" in spec:
                assert list(flat[name].shape) == list(spec["shape"]), f"{rel}:{name}"
                checked += 1
    assert checked > 0
