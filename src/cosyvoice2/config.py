"""The one place where CosyVoice 2's rates live.

Everything else derives from these numbers: 24 kHz audio, 480-sample hops give 50 Hz mel frames,
two mel frames per speech token give 25 Hz tokens. Components import ``RATES`` instead of restating
a literal 480 or 24000.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rates:
    sample_rate: int = 24000  # output audio, flow prompt mel
    hop_length: int = 480  # samples per mel frame at sample_rate
    n_mels: int = 80  # flow / vocoder mel bins
    token_mel_ratio: int = 2  # mel frames per speech token
    tokenizer_sample_rate: int = 16000  # speech tokenizer and CAM++ input rate
    min_input_sample_rate: int = 16000  # the official loader refuses prompts below this rate

    @property
    def mel_rate(self) -> float:
        """Mel frames per second (50)."""
        return self.sample_rate / self.hop_length

    @property
    def token_rate(self) -> float:
        """Speech tokens per second (25)."""
        return self.mel_rate / self.token_mel_ratio

    @property
    def samples_per_token(self) -> int:
        """Output audio samples per speech token (960)."""
        return self.hop_length * self.token_mel_ratio


RATES = Rates()
