"""Full-size (CosyVoice2-0.5B dims, random weights) flow estimator, one cache-less call over T frames, 2 CFG
rows: torch eager fp32 vs the same module exported by torch.onnx (TorchScript exporter, opset 17) run by
onnxruntime (CPU EP, all graph optimisations), both 1 thread. Process CPU seconds, median of reps.

Needs the ``onnx`` package for the export (not a dependency):
``nice -n 19 env OMP_NUM_THREADS=1 python bench/onnx_estimator.py [REPS]`` (bench/README.md).
"""

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

from cosyvoice2.flow import CacheWalk, Flow, FlowConfig

torch.set_num_threads(1)


class Wrap(torch.nn.Module):
    def __init__(self, est):
        super().__init__()
        self.est = est

    def forward(self, x, mask, mu, t, spks, cond):
        return self.est.run(x, mask, mu, t, spks, cond, None, CacheWalk())


torch.manual_seed(0)
w = Wrap(Flow(FlowConfig.cosyvoice2_0_5b()).eval().estimator).eval()


def inputs(T):
    g = torch.Generator().manual_seed(T)
    return (
        torch.randn(2, 80, T, generator=g),
        torch.ones(2, 1, T),
        torch.randn(2, 80, T, generator=g),
        torch.rand(2, generator=g),
        torch.randn(2, 80, generator=g),
        torch.randn(2, 80, T, generator=g),
    )


names = ["x", "mask", "mu", "t", "spks", "cond"]
path = str(Path(tempfile.mkdtemp()) / "estimator.onnx")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(
        w,
        inputs(56),
        path,
        dynamo=False,
        opset_version=17,
        input_names=names,
        output_names=["v"],
        dynamic_axes={k: {2: "n"} for k in ("x", "mask", "mu", "cond")},
    )
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
out = {"torch": torch.__version__, "onnxruntime": ort.__version__, "reps": reps}


def cpu(fn):
    fn()
    ts = []
    for _ in range(reps):
        c = time.process_time()
        fn()
        ts.append(time.process_time() - c)
    return statistics.median(ts)


for T in (56, 262):
    a = inputs(T)
    feed = {n: v.numpy() for n, v in zip(names, a)}
    with torch.inference_mode():
        ref = w(*a)
        t_torch = cpu(lambda a=a: w(*a))
    got = sess.run(None, feed)[0]
    t_ort = cpu(lambda feed=feed: sess.run(None, feed))
    out[f"T={T}"] = {
        "torch_cpu_s": round(t_torch, 4),
        "ort_cpu_s": round(t_ort, 4),
        "ort_over_torch": round(t_ort / t_torch, 3),
        "max_abs_diff": float(np.abs(got - ref.numpy()).max()),
        "mean_abs_v": float(ref.abs().mean()),
    }
    print(json.dumps(out), flush=True)
