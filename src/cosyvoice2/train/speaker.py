"""Speaker encoder stage: convert Resemblyzer's bundled voice encoder into our own weights file.

Nothing is trained here: the GE2E LSTM that ships inside the Resemblyzer wheel (Apache-2.0) is read
once and written as ``speaker_encoder.safetensors`` (float16, config and licence notice in the metadata),
which ``cosyvoice2.speaker.SpeakerEncoderModel`` loads with no dependency on resemblyzer. The wheel is
fetched with pip's ordinary client and is never installed (so neither librosa nor webrtcvad is needed)::

    pip download resemblyzer==0.1.4 --no-deps -d exp/downloads
    python -m cosyvoice2.train.speaker --source exp/downloads/Resemblyzer-0.1.4-py3-none-any.whl \\
        --out exp/speaker/speaker_encoder.safetensors

``--source`` may also be the ``pretrained.pt`` file itself, or ``installed`` to read it from an installed
resemblyzer package (found without importing it).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import zipfile
from pathlib import Path

from ..default_model import save_network
from ..errors import ModelLoadError
from ..speaker import RESEMBLYZER_NOTICE, SpeakerEncoderConfig, SpeakerEncoderModel, convert_resemblyzer

WHEEL_MEMBER = "resemblyzer/pretrained.pt"


def find_checkpoint(source: str, workdir: Path) -> Path:
    """A path to ``pretrained.pt`` from a wheel, the file itself, or an installed package."""
    if source == "installed":
        spec = importlib.util.find_spec("resemblyzer")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("resemblyzer is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    elif source.endswith(".whl"):
        with zipfile.ZipFile(source) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise ModelLoadError(f"{source} has no {WHEEL_MEMBER}")
            path = Path(wheel.extract(WHEEL_MEMBER, workdir))
    else:
        path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"Resemblyzer checkpoint not found: {path}")
    return path


def convert(source: str, out: Path) -> Path:
    cfg = SpeakerEncoderConfig()
    with tempfile.TemporaryDirectory() as tmp:
        state = convert_resemblyzer(find_checkpoint(source, Path(tmp)), cfg)
    model = SpeakerEncoderModel(cfg)
    model.load_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_network(out, model, kind="speaker_encoder", notice=RESEMBLYZER_NOTICE)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="Resemblyzer wheel, pretrained.pt, or 'installed'")
    ap.add_argument("--out", required=True, type=Path, help="output .safetensors")
    args = ap.parse_args(argv)
    print(convert(args.source, args.out))


if __name__ == "__main__":
    main()
