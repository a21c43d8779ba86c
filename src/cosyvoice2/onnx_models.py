"""The two frozen ONNX models of the CosyVoice 2 frontend, run with onnxruntime on CPU.

* ``SpeechTokenizer`` wraps ``speech_tokenizer_v2.onnx``: whisper log-mel [1, 128, T] (100 Hz)
  -> speech token ids [1, T_tok] (25 Hz, FSQ codebook 0..6560).
* ``SpeakerEncoder`` wraps ``campplus.onnx`` (CAM++): mean-normalised Kaldi fbank [1, T, 80]
  -> x-vector [1, 192] (not normalised; consumers L2-normalise).

Features come from ``cosyvoice2.audio`` (``whisper_log_mel``, ``campplus_features``). Input names
are read from the session rather than hard-coded, since the official frontend feeds them by position.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from cosyvoice2.audio import KALDI_FBANK, WHISPER_MEL
from cosyvoice2.errors import InputError, ModelLoadError

# The tokenizer was trained on whisper's 30-s windows; the official frontend asserts this limit.
MAX_TOKENIZER_SECONDS = 30.0
WHISPER_FRAME_RATE = WHISPER_MEL.sample_rate // WHISPER_MEL.hop_length  # 100 log-mel frames per second


def _session(path: str | os.PathLike, threads: int) -> ort.InferenceSession:
    """A CPU session with all graph optimisations, or ``ModelLoadError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX model not found: {path}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
        raise ModelLoadError(f"could not load ONNX model {path}: {e}") from e


def _input_names(session: ort.InferenceSession, path: str | os.PathLike, count: int) -> list[str]:
    names = [i.name for i in session.get_inputs()]
    if len(names) < count:
        raise ModelLoadError(f"ONNX model {path} has inputs {names}; expected at least {count}")
    return names[:count]


class SpeechTokenizer:
    """``speech_tokenizer_v2.onnx``: whisper log-mel -> 25 Hz speech tokens."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = _session(path, threads)
        self._feats_name, self._length_name = _input_names(self.session, path, 2)

    def tokens(self, feats: Tensor) -> Tensor:
        """feats [1, 128, T] float32 (``whisper_log_mel`` of 16 kHz audio) -> [1, T_tok] int32.

        T_tok is about T / 4 (the model downsamples 100 Hz features to 25 Hz). Features longer than
        30 s are refused, as in the official frontend.
        """
        if feats.dim() != 3 or feats.shape[0] != 1:
            raise InputError(f"speech tokenizer expects features [1, n_mels, T], got {list(feats.shape)}")
        frames = feats.shape[2]
        if frames > MAX_TOKENIZER_SECONDS * WHISPER_FRAME_RATE:
            raise InputError(
                f"audio for the speech tokenizer is {frames / WHISPER_FRAME_RATE:.2f} s long; "
                f"at most {MAX_TOKENIZER_SECONDS:g} s is supported"
            )
        inputs = {
            self._feats_name: feats.detach().cpu().numpy().astype(np.float32, copy=False),
            self._length_name: np.array([frames], dtype=np.int32),
        }
        ids = self.session.run(None, inputs)[0]
        return torch.from_numpy(np.asarray(ids).reshape(1, -1).astype(np.int32))


class SpeakerEncoder:
    """``campplus.onnx`` (CAM++): mean-normalised fbank -> 192-d speaker embedding."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.session = _session(path, threads)
        (self._input_name,) = _input_names(self.session, path, 1)

    def embed(self, feats: Tensor) -> Tensor:
        """feats [1, T, 80] float32 (``campplus_features`` of 16 kHz audio) -> [1, 192] float32."""
        n_mels = KALDI_FBANK.n_mels
        if feats.dim() != 3 or feats.shape[0] != 1 or feats.shape[2] != n_mels or feats.shape[1] == 0:
            raise InputError(f"speaker encoder expects features [1, T, {n_mels}], got {list(feats.shape)}")
        inputs = {self._input_name: feats.detach().cpu().numpy().astype(np.float32, copy=False)}
        embedding = self.session.run(None, inputs)[0]
        return torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(1, -1))
