"""Streamed flow blocks through onnxruntime vs torch: one full-size (CosyVoice2-0.5B dims, random weights)
estimator ODE step (2 CFG rows) on a block of n tokens (2n frames + 3 look-ahead tokens) after a 3 s voice
prompt, with the stream's caches (conv contexts, past keys/values) fed to the exported graph as inputs.

Issue 12 asked whether onnxruntime's fused kernels beat torch's ~2000 small ops per step of a short block.
The estimator is exported by the TorchScript exporter (opset 17) with its streaming state as flat graph
inputs/outputs in ``flow.CacheWalk``'s layer order; "ort_int8" is that graph through onnxruntime's
``quantize_dynamic`` (MatMul weights int8 per channel). torch rows are the flow as ``speed_up`` leaves it
(fp32, bf16 autocast with bf16 weights, int8 dynamic Linears). Wall ms, median of 5, two rounds per
setting. Needs the ``onnx`` package (not a dependency): results and verdict in bench/README.md "amx".

    python bench/onnx_stream.py [THREADS] [TOKENS,...]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import _FlowOnly, random_voice  # noqa: E402
from cosyvoice2.api import speed_up  # noqa: E402
from cosyvoice2.flow import CacheWalk, Flow, FlowConfig, _append_tail  # noqa: E402


class LayerOrder:
    """Records the stateful layers in call order: ("conv", channels, k) or ("attn", heads, head_dim)."""

    streaming = True

    def __init__(self) -> None:
        self.kinds: list[tuple[str, int, int]] = []

    def conv_context(self, x, k):
        self.kinds.append(("conv", x.shape[1], k))
        return torch.cat([x.new_zeros(x.shape[0], x.shape[1], k), x], dim=-1)

    def attend(self, q, k, v, allowed):
        self.kinds.append(("attn", k.shape[1], k.shape[3]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class FlatWalk:
    """Export-time walk: the state comes from graph inputs, the new state goes to graph outputs."""

    streaming = True

    def __init__(self, contexts, pasts) -> None:
        self._contexts, self._pasts, self.out = iter(contexts), iter(pasts), []

    def conv_context(self, x, k):
        h = torch.cat([next(self._contexts), x], dim=-1)
        self.out.append(h[..., h.shape[-1] - k :])
        return h

    def attend(self, q, k, v, allowed):
        past_k, past_v = next(self._pasts), next(self._pasts)
        self.out += [k, v]
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)


class Flat(torch.nn.Module):
    def __init__(self, estimator, n_conv: int) -> None:
        super().__init__()
        self.estimator, self.n_conv = estimator, n_conv

    def forward(self, x, mu, t, spks, cond, allowed, *state):
        walk = FlatWalk(state[: self.n_conv], state[self.n_conv :])
        v = self.estimator.run(x, torch.ones_like(x[:, :1]), mu, t, spks, cond, allowed, walk)
        return (v, *walk.out)


def export(estimator, kinds, path: Path) -> None:
    m, n, p, b = estimator.cfg.out_channels, 8, 4, 2
    g = torch.Generator().manual_seed(0)
    x, mu, cond = (torch.randn(b, m, n, generator=g) for _ in range(3))
    t, spks = torch.rand(b, generator=g), torch.randn(b, m, generator=g)
    allowed = torch.ones(1, 1, n, p + n, dtype=torch.bool)
    ctx = [torch.randn(b, c, k, generator=g) for kind, c, k in kinds if kind == "conv"]
    past = [torch.randn(b, h, p, d, generator=g) for kind, h, d in kinds if kind == "attn" for _ in range(2)]
    names = ["x", "mu", "t", "spks", "cond", "allowed"] + [f"c{i}" for i in range(len(ctx) + len(past))]
    outs = ["v"] + [f"o{i}" for i in range(len(ctx) + len(past))]
    dyn = {k: {0: "b", 2: "n"} for k in ("x", "mu", "cond", "v")} | {"t": {0: "b"}, "spks": {0: "b"}}
    dyn["allowed"] = {2: "n", 3: "s"}
    for i in range(len(ctx)):
        dyn[f"c{i}"], dyn[f"o{i}"] = {0: "b"}, {0: "b"}
    for i in range(len(ctx), len(ctx) + len(past)):
        dyn[f"c{i}"], dyn[f"o{i}"] = {0: "b", 2: "p"}, {0: "b", 2: "n"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Flat(estimator, len(ctx)).eval(), (x, mu, t, spks, cond, allowed, *ctx, *past),
                          str(path), dynamo=False, opset_version=17, input_names=names, output_names=outs,
                          dynamic_axes=dyn)  # fmt: skip


class OrtEstimator(torch.nn.Module):
    """The estimator's ``run`` for one stream's ``CacheWalk``: reads the walk's entries, runs the graph, keeps
    its outputs back as the torch layers do (so the stream state is the torch path's)."""

    def __init__(self, inner, path: Path, kinds, threads: int) -> None:
        super().__init__()
        self.inner, self.cfg, self.kinds = inner, inner.cfg, kinds
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, x, mask, mu, t, spks, cond, allowed, cache):
        if type(cache) is not CacheWalk or not cache.streaming or cache.share:
            return self.inner.run(x, mask, mu, t, spks, cond, allowed, cache)
        b, n = x.shape[0], x.shape[-1]
        contexts, pasts, kept = [], [], []
        for kind, c, k in self.kinds:
            if kind == "conv":
                ctx = cache.take()
                contexts.append(x.new_zeros(b, c, k) if ctx is None else ctx.float())
                continue
            heads = [cache.take() for _ in range(4)]  # key head, key tail, value head, value tail
            buffers = (cache.take_buffer(), cache.take_buffer())
            for pair in (heads[:2], heads[2:]):
                parts = [s.float() for s in pair if s is not None and s.shape[2]]
                pasts.append(torch.cat(parts, dim=2) if parts else x.new_zeros(b, c, 0, k))
            kept.append((heads, buffers))
        p = pasts[0].shape[2]
        allowed = torch.ones(1, 1, n, p + n, dtype=torch.bool) if allowed is None else allowed
        feeds = [x, mu, t, spks, cond, allowed, *contexts, *pasts]
        outs = self.session.run(None, {k: a.numpy() for k, a in zip(self.names, feeds)})
        it, attn = iter(outs[1:]), iter(kept)
        for kind, _, _ in self.kinds:
            if kind == "conv":
                cache.keep(torch.from_numpy(next(it)))
                continue
            (k_head, k_tail, v_head, v_tail), (k_buf, v_buf) = next(attn)
            new_buffers = []
            for head, tail, buf in ((k_head, k_tail, k_buf), (v_head, v_tail, v_buf)):
                new = torch.from_numpy(next(it))
                tail, buf = _append_tail(tail, buf, new)
                cache.keep(new.new_empty(b, new.shape[1], 0, new.shape[3]) if head is None else head)
                cache.keep(tail)
                new_buffers.append(buf)
            cache.keep_buffer(new_buffers[0]), cache.keep_buffer(new_buffers[1])
        return torch.from_numpy(outs[0])


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    sizes = [int(a) for a in sys.argv[2].split(",")] if len(sys.argv) > 2 else [3, 6, 11, 25, 50]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = Flow(FlowConfig.cosyvoice2_0_5b()).eval()
    flows = {"fp32": base}
    for q in ("bf16", "int8"):
        flows[q] = speed_up(_FlowOnly(copy.deepcopy(base)), flow_quant=q).flow
    walk = LayerOrder()
    with torch.inference_mode():
        z = torch.zeros(1, 80, 2)
        base.estimator.run(z, torch.ones(1, 1, 2), z, torch.zeros(1), torch.zeros(1, 80), z, None, walk)
    tmp = Path(tempfile.mkdtemp())
    export(base.estimator, walk.kinds, tmp / "fp32.onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(tmp / "fp32.onnx", tmp / "int8.onnx", weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"])  # fmt: skip
    for q in ("fp32", "int8"):
        f = copy.deepcopy(base)
        f.estimator = OrtEstimator(f.estimator, tmp / f"{q}.onnx", walk.kinds, threads)
        flows[f"ort_{q}"] = f
    voice = random_voice()
    ids = torch.randint(0, 6561, (1, 103), generator=torch.Generator().manual_seed(1))
    out: dict = {"threads": threads, "torch": torch.__version__, "onnxruntime": ort.__version__}
    with torch.inference_mode():
        for n in sizes:
            row, mels = {}, {}
            for _ in range(2):
                for name, f in flows.items():
                    st = f.stream_start(voice.speech_tokens[None], voice.mel[None], voice.embedding[None])
                    block = f.stream_prepare(st, ids[:, :n], ids[:, n : n + 3], final=False)
                    f.euler_step([block])
                    mels[name] = block.ode.x.clone()
                    times = []
                    for _ in range(5):
                        t = time.perf_counter()
                        f.euler_step([block])
                        times.append(time.perf_counter() - t)
                    row.setdefault(f"{name}_ms", []).append(round(1000 * statistics.median(times), 1))
            row["ort_fp32_max_abs_diff_after_1_step"] = float((mels["ort_fp32"] - mels["fp32"]).abs().max())
            out[f"{n}_tokens"] = row
            print(json.dumps({f"{n}_tokens": row}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
