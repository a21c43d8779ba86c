"""Loading a model directory: the official layout as downloaded, and every way it can be broken.

Each broken directory must give a ModelLoadError that names the file (and the key, for weights).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import cosyvoice2
from cosyvoice2 import ModelLoadError
from cosyvoice2.official_yaml import load_official_yaml


@pytest.fixture()
def model_copy(fixtures, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(fixtures / "e2e_small" / "model", dst)  # follows the flow.pt / hift.pt symlinks
    return dst


def test_yaml_is_parsed_not_executed(fixtures):
    cfg = load_official_yaml(fixtures / "e2e_small" / "model" / "cosyvoice2.yaml")
    keys = ("llm", "llm.sampling", "flow", "flow.encoder", "flow.decoder", "flow.decoder.estimator", "hift")
    for key in keys:
        assert key in cfg
    # `!ref <chunk_size> * <token_mel_ratio>` is evaluated as arithmetic, not code.
    est = cfg["flow.decoder.estimator"]["args"]["static_chunk_size"]
    assert est == cfg["chunk_size"] * cfg["token_mel_ratio"]
    # the component configs equal the fixtures' config.json files, which were written from the same objects
    import json

    for comp in ("flow_small", "hift_small"):
        ref = json.loads((fixtures / comp / "config.json").read_text())
        for key, entry in ref.items():
            assert cfg[key]["args"] == entry["args"], key


@pytest.mark.parametrize(
    "name", ["llm.pt", "flow.pt", "hift.pt", "cosyvoice2.yaml", "campplus.onnx", "speech_tokenizer_v2.onnx"]
)
def test_missing_file_is_named(model_copy, name):
    (model_copy / name).unlink()
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        cosyvoice2.load(model_copy)


@pytest.mark.parametrize("name", ["llm.pt", "flow.pt", "hift.pt", "campplus.onnx"])
def test_corrupt_file_is_named(model_copy, name):
    data = (model_copy / name).read_bytes()
    (model_copy / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        cosyvoice2.load(model_copy)


def test_wrong_shape_and_missing_key_are_named(model_copy):
    sd = torch.load(model_copy / "hift.pt", weights_only=True)
    key = next(k for k in sd if k.startswith("conv_post"))
    sd[key] = torch.zeros(3, 3)
    torch.save(sd, model_copy / "hift.pt")
    with pytest.raises(ModelLoadError, match="hift.pt"):
        cosyvoice2.load(model_copy)
    sd = torch.load(model_copy / "flow.pt", weights_only=True)
    missing = sorted(sd)[0]
    del sd[missing]
    torch.save(sd, model_copy / "flow.pt")
    with pytest.raises(ModelLoadError, match="flow.pt") as err:  # flow loads before hift
        cosyvoice2.load(model_copy)
    assert "missing key" in str(err.value)


def test_yaml_with_bad_ref_or_syntax(model_copy):
    yaml_path = model_copy / "cosyvoice2.yaml"
    text = yaml_path.read_text()
    yaml_path.write_text(text.replace("!ref <token_frame_rate>", "!ref <no_such_entry>"))
    with pytest.raises(ModelLoadError, match="no_such_entry"):
        cosyvoice2.load(model_copy)
    yaml_path.write_text("llm: [unclosed\n")
    with pytest.raises(ModelLoadError, match="cosyvoice2.yaml"):
        cosyvoice2.load(model_copy)


def test_spk2info_speakers_become_voices(model_copy, fixtures):
    shutil.copy(fixtures / "e2e_small" / "zero_shot_spk" / "spk2info.pt", model_copy / "spk2info.pt")
    tts = cosyvoice2.load(model_copy)
    names = tts.speakers()
    assert names
    audio = tts.synthesize("Hello.", voice=names[0], seed=1)  # by name
    default = tts.synthesize("Hello.", seed=1)  # a model with speakers has a default voice
    assert audio.size > 0 and default.size > 0
