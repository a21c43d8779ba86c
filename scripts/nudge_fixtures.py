"""Check that the parity tests really compare: run them on a copy of the fixtures with nudged outputs.

    python scripts/nudge_fixtures.py /tmp/nudged              # make the copy in /tmp/nudged/fixtures
    python scripts/nudge_fixtures.py /tmp/nudged --run        # ... and run each parity test file on it

The copy (symlinks to the fixture root, except the nudged files; a ``reference`` link beside it, as the
tests expect) changes every official output:

* every floating-point tensor of the data files listed in ``tensor_manifest.json`` gets ``+delta`` (0.01),
  except the generated inputs (``*/inputs.pt``, ``audio/signal.pt``); weights are left alone;
* the stored speaker (``spk2info.pt``) likewise;
* text outputs, which have no decimals: token ids get +1 (``encode.json``) and every normalised string a
  mark appended (``text_normalize.json``).

Every parity test file must then fail (``--run`` prints each file's pytest summary and exits 1 if any
passes; by hand: COSYVOICE2_FIXTURES=/tmp/nudged/fixtures). Some tests also read a nudged tensor as their
input: they fail too, which is expected. Exact token-list comparisons are not nudged.
The fixture root is ``--root``, else COSYVOICE2_FIXTURES, else ../shared/fixtures.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARITY_TESTS = (
    "tests/test_text.py",
    "tests/test_audio.py",
    "tests/test_lm.py",
    "tests/test_flow.py",
    "tests/test_hift.py",
    "tests/test_pipeline.py",
    "tests/test_e2e.py",
)
INPUT_FILES = ("*/inputs.pt", "audio/signal.pt")
TEXT_MARK = "~"


def _nudge_tensors(data: object, delta: float) -> object:
    if isinstance(data, torch.Tensor):
        return data + delta if data.is_floating_point() else data
    if isinstance(data, dict):
        return {k: _nudge_tensors(v, delta) for k, v in data.items()}
    return data


def _nudge_encode(data: dict) -> dict:
    for case in data["cases"]:
        case["ids"] = [i + 1 for i in case["ids"]]
    return data


def _nudge_normalize(data: dict) -> dict:
    for setup in data.values():
        if not isinstance(setup, dict):
            continue
        for case in setup.get("cases", []):
            case["split"] = [p + TEXT_MARK for p in case["split"]]
            case["nosplit"] += TEXT_MARK
        for call in setup.get("wetext_calls", []):
            call["out"] += TEXT_MARK
    return data


def nudge(root: Path, out: Path, delta: float) -> list[str]:
    """Build the nudged copy of ``root`` in ``out``; returns the relative paths of the changed files."""
    manifest = json.loads((root / "tensor_manifest.json").read_text())
    tensors = {rel for rel in manifest if not any(fnmatch.fnmatchcase(rel, p) for p in INPUT_FILES)}
    tensors |= {p.relative_to(root).as_posix() for p in root.rglob("spk2info.pt")}
    texts = {"tokenizer/encode.json": _nudge_encode, "tokenizer/text_normalize.json": _nudge_normalize}
    changed = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if rel in tensors:
            torch.save(_nudge_tensors(torch.load(path, map_location="cpu", weights_only=True), delta), target)
        elif rel in texts:
            data = texts[rel](json.loads(path.read_text(encoding="utf-8")))
            target.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        else:
            target.symlink_to(path.resolve())
            continue
        changed.append(rel)
    return changed


def run_parity_tests(out: Path) -> bool:
    """Each parity test file on the nudged copy; True if every one failed."""
    env = dict(os.environ, COSYVOICE2_FIXTURES=str(out))
    all_failed = True
    for test in PARITY_TESTS:
        cmd = [sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        failed = result.returncode != 0
        all_failed &= failed
        print(f"{'fails' if failed else 'PASSES'}  {test}: {summary}")
    return all_failed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="folder for the nudged copy (outside the repository)")
    parser.add_argument("--root", type=Path, default=None, help="fixture root to copy")
    parser.add_argument("--delta", type=float, default=0.01)
    parser.add_argument("--run", action="store_true", help="run each parity test file on the copy")
    args = parser.parse_args()
    default = os.environ.get("COSYVOICE2_FIXTURES", REPO.parent / "shared" / "fixtures")
    root = (args.root or Path(default)).resolve()
    out = args.out.resolve()
    dest = out / "fixtures"
    if any(a == b or a in b.parents for a, b in ((dest, root), (root, dest), (REPO, dest), (dest, REPO))):
        parser.error("build the copy outside the repository and the fixture root")
    changed = nudge(root, dest, args.delta)
    reference = root.parent / "reference"
    if reference.is_dir() and not (out / "reference").exists():
        (out / "reference").symlink_to(reference)
    print(f"nudged {len(changed)} files of {root} into {dest}")
    return 0 if not args.run or run_parity_tests(dest) else 1


if __name__ == "__main__":
    sys.exit(main())
