#!/usr/bin/env python3
"""Whole models against PyTorch CPU and ONNX Runtime CPU, measured side by side in one run.

    python benchmarks/models.py                  # ResNet- and MobileNet-v2-style nets + the zoo
    python benchmarks/models.py --quick          # fewer runs, smaller budgets (a few minutes)
    python benchmarks/models.py --only resnet mobilenet_v2 --out bench-out/

imported: a ResNet-style and a MobileNet-v2-style net (see :func:`torch_nets`) defined once in
        PyTorch and exported by torch.onnx.export (BatchNorm kept unfolded) when torch is
        importable, else the same architecture built as a dnnpar Graph (:func:`dnnpar_nets`) and
        exported with dnnpar.interop.to_onnx. dnnpar imports that ONNX file with from_onnx and
        onnxruntime runs the same file. Inference at batch 1 and 64 (dnnpar, PyTorch, ORT) and a
        training step (forward + cross-entropy + backward + SGD step, batch 16 and 64; dnnpar and
        PyTorch: the CPU onnxruntime package does not train).
zoo:    training steps of LeNet-300-100, LeNet-5 (batch 64), MobileNet v1 alpha 0.5 at 96x96 and
        VGG-16 at 32x32 (batch 16), and with --large AlexNet 227x227 (batch 8), VGG-16 224x224
        (batch 2) and MobileNet v1 224x224 (batch 8), 1000 classes: dnnpar's models against the
        nn.Sequential that dnnpar.interop.torch_definition writes for them, same weights.

torch and onnxruntime are optional peers (``pip install 'dnnpar[peers]'``, torch's CPU wheel):
without one its columns say so. All frameworks get the same thread count (this machine's cores;
printed). Prints a plain-text table, writes it as markdown and the raw numbers as JSON into --out.
A measurement, never a test.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -m benchmarks.models`
from _common import (OtherLoad, blas_name, common_meta, cpu_cores, dnnpar_train_step, median,  # noqa: E402
                     optional_torch, rel_err, render_markdown, render_text, rss_mb, run_and_report, run_section,
                     sgemm_peak_gflops, time_runs, torch_train_step, training_flops, write_report)

import dnnpar as dp  # noqa: E402  (_common put the checkout on sys.path)
from dnnpar.nn.fusion import fold_batchnorm  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
INFER_BATCHES, TRAIN_BATCHES = (1, 64), (16, 64)
#: zoo rows: (key for --only, dnnpar.nn.models name, build kwargs, batch)
ZOO = (("lenet300", "lenet300", {}, 64), ("lenet5", "lenet5", {}, 64),
       ("mobilenet_v1", "mobilenet_v1", dict(alpha=0.5, resolution=96, num_classes=10), 16),
       ("vgg16", "vgg16", dict(in_shape=(3, 32, 32), num_classes=10), 16))
#: the ImageNet-sized rows (--large: each step takes seconds on a laptop-class CPU): AlexNet at a
#: small batch, VGG-16 and MobileNet v1 (alpha 1) at 224x224, 1000 classes
LARGE = (("alexnet", "alexnet", {}, 8),
         ("vgg16_224", "vgg16", {}, 2),
         ("mobilenet_v1_224", "mobilenet_v1", {}, 8))
FRAMEWORKS = ("dnnpar", "torch", "ort")
ARCH_NAMES = {"resnet": "ResNet-style", "mobilenet_v2": "MobileNet-v2-style"}
RSS_STEPS = 3


# ---------------------------------------------------------------------------- the two architectures
#: (width multiplier, input (C, H, W)) of each architecture; --quick and tests pass smaller ones
RESNET = dict(width=16, in_shape=(3, 32, 32))
MOBILENET_V2 = dict(width=16, in_shape=(3, 64, 64))
#: MobileNet v2's inverted-residual stages: (expansion t, output channels as multiples of the
#: width, blocks n, first stride s), a shortened version of the paper's Table 2
MOBILENET_V2_STAGES = ((1, 1, 1, 1), (4, 1.5, 2, 2), (4, 2, 2, 2))


def torch_nets(torch):
    """PyTorch definitions of the ResNet-style and the MobileNet-v2-style net: {name: class}.

    ResNet-style: conv-BN-ReLU stem; basic blocks (two 3x3 conv-BN, a residual Add, a 1x1 conv-BN
    shortcut where the shape changes) at widths w, 2w, 4w; AvgPool 3x3 stride 1 padding 1
    (padding counted); a BatchNorm after it that no conv precedes, so every exporter keeps one
    BatchNormalization node; global average pool, flatten, Linear, optional Softmax.
    MobileNet-v2-style: conv-BN-ReLU6 stem at stride 2; inverted residuals (1x1 expand-BN-ReLU6,
    3x3 depthwise-BN-ReLU6, 1x1 project-BN, Add when the shape is kept); a Concat of a 1x1
    conv-BN-ReLU6 branch and an AvgPool 3x3 padding 1 branch (padding not counted); global
    average pool, ``x.reshape(x.shape[0], -1)``, Linear, optional Softmax."""
    nn = torch.nn

    def conv_bn(cin, cout, k=3, s=1, groups=1, act=None):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU), conv_bn(cout, cout, 3))
            self.short = nn.Identity() if (cin, stride) == (cout, 1) else conv_bn(cin, cout, 1, stride)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.short(x))

    class ResNet(nn.Module):
        def __init__(self, width=16, in_shape=(3, 32, 32), num_classes=10, softmax=True):
            super().__init__()
            w = width
            self.stem = conv_bn(in_shape[0], w, act=nn.ReLU)
            self.blocks = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
            self.pool = nn.AvgPool2d(3, stride=1, padding=1)
            self.bn = nn.BatchNorm2d(4 * w)
            self.fc = nn.Linear(4 * w, num_classes)
            self.softmax = softmax

        def forward(self, x):
            x = self.bn(self.pool(self.blocks(self.stem(x))))
            x = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
            return torch.softmax(x, dim=1) if self.softmax else x

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hid = cin * t
            self.res = (cin, stride) == (cout, 1)
            expand = [conv_bn(cin, hid, 1, act=nn.ReLU6)] if t != 1 else []
            self.conv = nn.Sequential(*expand, conv_bn(hid, hid, 3, stride, groups=hid, act=nn.ReLU6),
                                      conv_bn(hid, cout, 1))

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, width=16, in_shape=(3, 64, 64), num_classes=10, softmax=True):
            super().__init__()
            self.stem = conv_bn(in_shape[0], width, 3, 2, act=nn.ReLU6)
            blocks, c = [], width
            for t, mult, n, s in MOBILENET_V2_STAGES:
                for k in range(n):
                    blocks.append(InvertedResidual(c, int(mult * width), s if k == 0 else 1, t))
                    c = int(mult * width)
            self.blocks = nn.Sequential(*blocks)
            self.branch = conv_bn(c, c, 1, act=nn.ReLU6)
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
            self.fc = nn.Linear(2 * c, num_classes)
            self.softmax = softmax

        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = nn.functional.adaptive_avg_pool2d(torch.cat([self.branch(x), self.pool(x)], dim=1), 1)
            x = self.fc(x.reshape(x.shape[0], -1))
            return torch.softmax(x, dim=1) if self.softmax else x

    return {"resnet": ResNet, "mobilenet_v2": MobileNetV2}


def dnnpar_nets():
    """The same two architectures as dnnpar Graphs ({name: builder(width, in_shape, num_classes,
    softmax, seed)}): what the benchmark exports with to_onnx when torch is not importable."""
    from dnnpar import nn
    from dnnpar.nn.graph import Add, Concat

    def conv_bn_into(nodes, seed):
        """``conv_bn(name, x, ...)``: appends conv (no bias) -> BatchNorm -> optional activation
        to ``nodes`` and returns the name of the last."""
        def conv_bn(name, x, cin, cout, k=3, s=1, groups=1, act=None):
            nodes.append((f"{name}.conv", nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False,
                                                    seed=seed + len(nodes)), [x]))
            nodes.append((f"{name}.bn", nn.BatchNorm2d(cout), [f"{name}.conv"]))
            if act is None:
                return f"{name}.bn"
            nodes.append((f"{name}.act", act(), [f"{name}.bn"]))
            return f"{name}.act"
        return conv_bn

    def resnet(width=16, in_shape=(3, 32, 32), num_classes=10, softmax=True, seed=0):
        nodes, w = [], width

        conv_bn = conv_bn_into(nodes, seed)
        x = conv_bn("stem", "input", in_shape[0], w, act=nn.ReLU)
        for b, (cin, cout, s) in enumerate([(w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2)]):
            y = conv_bn(f"block{b}.body1", conv_bn(f"block{b}.body0", x, cin, cout, 3, s, act=nn.ReLU), cout, cout)
            skip = x if (cin, s) == (cout, 1) else conv_bn(f"block{b}.short", x, cin, cout, 1, s)
            nodes += [(f"block{b}.add", Add(), [y, skip]), (f"block{b}.relu", nn.ReLU(), [f"block{b}.add"])]
            x = f"block{b}.relu"
        nodes += [("pool", nn.AvgPool2d(3, 1, 1), [x]), ("bn", nn.BatchNorm2d(4 * w), ["pool"]),
                  ("gap", nn.GlobalAvgPool2d(), ["bn"]), ("fc", nn.Linear(4 * w, num_classes, seed=seed), ["gap"])]
        if softmax:
            nodes.append(("softmax", nn.Softmax(1), ["fc"]))
        return nn.Graph(nodes, input_shape=tuple(in_shape), name="resnet_style")

    def mobilenet_v2(width=16, in_shape=(3, 64, 64), num_classes=10, softmax=True, seed=0):
        nodes = []

        conv_bn = conv_bn_into(nodes, seed)
        x, c, b = conv_bn("stem", "input", in_shape[0], width, 3, 2, act=nn.ReLU6), width, 0
        for t, mult, n, s in MOBILENET_V2_STAGES:
            for k in range(n):
                cout, stride, hid = int(mult * width), s if k == 0 else 1, c * t
                y = conv_bn(f"ir{b}.expand", x, c, hid, 1, act=nn.ReLU6) if t != 1 else x
                y = conv_bn(f"ir{b}.dw", y, hid, hid, 3, stride, groups=hid, act=nn.ReLU6)
                y = conv_bn(f"ir{b}.project", y, hid, cout, 1)
                if (c, stride) == (cout, 1):
                    nodes.append((f"ir{b}.add", Add(), [y, x]))
                    y = f"ir{b}.add"
                x, c, b = y, cout, b + 1
        branch = conv_bn("branch", x, c, c, 1, act=nn.ReLU6)
        nodes += [("pool", nn.AvgPool2d(3, 1, 1, count_include_pad=False), [x]),
                  ("cat", Concat(), [branch, "pool"]), ("gap", nn.GlobalAvgPool2d(keepdims=True), ["cat"]),
                  ("flatten", nn.Flatten(), ["gap"]), ("fc", nn.Linear(2 * c, num_classes, seed=seed), ["flatten"])]
        if softmax:
            nodes.append(("softmax", nn.Softmax(1), ["fc"]))
        return nn.Graph(nodes, input_shape=tuple(in_shape), name="mobilenet_v2_style")

    return {"resnet": resnet, "mobilenet_v2": mobilenet_v2}


def optional_ort():
    """onnxruntime when importable (an optional peer), else None."""
    try:
        import onnxruntime
        return onnxruntime
    except Exception:
        return None


def export_onnx(name, torch, cfg, seed=0) -> tuple[bytes, str]:
    """(ONNX bytes, who made them) of architecture ``name`` with logits out (no softmax): exported
    from PyTorch when torch is given, else from the dnnpar twin."""
    if torch is not None:
        torch.manual_seed(seed)
        m = torch_nets(torch)[name](**cfg, softmax=False).eval()
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (torch.randn(2, *cfg["in_shape"]),), f, input_names=["x"], output_names=["y"],
                              opset_version=17, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        return f.getvalue(), f"torch.onnx.export {torch.__version__} (TorchScript, BatchNorm unfolded), opset 17"
    from dnnpar.interop import to_onnx
    return to_onnx(dnnpar_nets()[name](**cfg, softmax=False, seed=seed), opset=17).SerializeToString(), \
        "dnnpar to_onnx (torch not installed), opset 17"


def torch_twin(torch, model):
    """The nn.Sequential torch_definition writes for a zoo model, holding the same weights."""
    from dnnpar.interop import name_map, torch_definition

    ns = {}
    exec(torch_definition(model), ns)  # noqa: S102 -- dnnpar's own generated source
    tm = ns["model"]
    state, names = model.state_dict(), name_map(model, "torch")
    tm.load_state_dict({names[k]: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    return tm


def torch_from_onnx_arch(torch, name, cfg):
    """The torch net :func:`export_onnx` exported (same seed: same weights)."""
    torch.manual_seed(0)
    return torch_nets(torch)[name](**cfg, softmax=False)


# ---------------------------------------------------------------------------- one training step each
def dnnpar_step(model):
    return dnnpar_train_step(model, LR, MOMENTUM, WEIGHT_DECAY)


def torch_step(torch, model):
    return torch_train_step(torch, model, LR, MOMENTUM, WEIGHT_DECAY)


def batch_of(rng, in_shape, batch):
    return rng.standard_normal((batch, *in_shape), dtype=np.float32), rng.integers(0, 10, batch)


# ---------------------------------------------------------------------------- peak RSS, one process each
def rss_child(spec: dict) -> dict:
    """In a fresh process: build one framework's model, take one step, then RSS_STEPS more; the
    resident set before the steps and the process's peak."""
    torch = optional_torch() if spec["framework"] == "torch" else None
    if torch is not None:
        torch.set_num_threads(spec["threads"])
    dp.set_backend("numpy")
    rng = np.random.default_rng(0)
    if spec["kind"] == "zoo":
        from dnnpar.nn.models import build
        model = build(spec["name"], **spec["kwargs"])
        in_shape = model.input_shape
        if torch is not None:
            model = torch_twin(torch, model)
    else:
        in_shape = tuple(spec["cfg"]["in_shape"])
        if torch is not None:
            model = torch_from_onnx_arch(torch, spec["name"], spec["cfg"])
        else:
            from dnnpar.interop import from_onnx
            model = from_onnx(Path(spec["onnx"]).read_bytes())
    step = torch_step(torch, model) if torch is not None else dnnpar_step(model)
    xb, yb = batch_of(rng, in_shape, spec["batch"])
    before, _ = rss_mb()
    for _ in range(1 + RSS_STEPS):
        step(xb, yb)
    now, peak = rss_mb()
    return {"before_mb": before, "peak_mb": peak}


def measure_rss(spec: dict) -> dict | None:
    """peak RSS of ``spec`` (see rss_child) measured in a subprocess; None if it failed."""
    r = subprocess.run([sys.executable, __file__, "--rss-child", json.dumps(spec)], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        print(f"rss child failed: {r.stderr[-500:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- results
@dataclass
class Row:
    """One model and step, timed on each framework that could run it."""
    section: str
    model: str
    step: str                    # "inference" | "train step"
    batch: int
    flops: float = 0.0           # floating-point operations of one run
    runs_ms: dict = field(default_factory=dict)       # framework -> ms of each run
    rss: dict = field(default_factory=dict)           # framework -> {"before_mb", "peak_mb"}
    other_cores: dict = field(default_factory=dict)   # framework -> cores others kept busy meanwhile
    check: str = ""
    note: str = ""

    def ms(self, fw):
        return median(self.runs_ms.get(fw, []))

    def gflops(self, fw):
        ms = self.ms(fw)
        return self.flops / (ms * 1e-3) / 1e9 if ms and self.flops else None

    def ratio(self, fw):
        a, b = self.ms("dnnpar"), self.ms(fw)
        return a / b if a and b else None


class ModelsBench:
    COLUMNS = ("model", "step", "batch", "dnnpar ms", "torch ms", "ORT ms", "dnnpar/torch", "dnnpar/ORT",
               "GFLOP/s dnnpar | torch | ORT", "peak RSS MB dnnpar | torch", "check")
    RIGHT = {2, 3, 4, 5, 6, 7, 8, 9}

    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.rows: list[Row] = []
        self.meta = common_meta("numpy", args)
        self.meta["blas"] = blas_name()
        self.threads = args.threads or cpu_cores()
        self.torch, self.ort = optional_torch(), optional_ort()
        if self.torch is not None:
            self.torch.set_num_threads(self.threads)
            self.meta["torch"] = f"{self.torch.__version__} (CPU, {self.torch.get_num_threads()} threads)"
        else:
            self.meta["torch"] = "not installed (no peer; pip install 'dnnpar[peers]' with torch's CPU wheel)"
        self.meta["onnxruntime"] = (f"{self.ort.__version__} (CPUExecutionProvider, {self.threads} intra-op threads)"
                                    if self.ort is not None else "not installed (no peer)")
        self.meta["dnnpar threads"] = f"{self.threads} (numpy backend: BLAS's threads, OPENBLAS_NUM_THREADS)"
        self.repeat = args.repeat or (5 if self.quick else 20)
        self.budget_s = 1.0 if self.quick else 4.0
        self.rng = np.random.default_rng(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="dnnpar-models-bench-"))
        self.arch = {"resnet": dict(RESNET), "mobilenet_v2": dict(MOBILENET_V2)}

    def time(self, row: Row, fw: str, fn) -> object:
        with OtherLoad() as load:
            runs, first = time_runs(fn, self.repeat, self.budget_s)
        row.runs_ms[fw], row.other_cores[fw] = runs, load.cores
        return first

    def section(self, name: str, fn) -> None:
        """Run one group; a failure becomes an error row and the run goes on."""
        run_section(name, fn, self.args.only, self.meta,
                    lambda msg: self.rows.append(Row(name, name, "error", 0, note=msg)))

    def run(self) -> None:
        dp.set_backend("numpy")
        self.meta["measured peak"] = (f"{sgemm_peak_gflops(budget_s=1.0 if self.quick else 3.0):,.0f} GFLOP/s "
                                      "(NumPy SGEMM 2048^3, this run)")
        for name in ("resnet", "mobilenet_v2"):
            self.section(name, lambda name=name: self.imported(name))
        for key, name, kwargs, batch in ZOO + (LARGE if self.args.large else ()):
            self.section(key, lambda n=name, k=kwargs, b=batch: self.zoo(n, k, b))

    # ---- imported: one ONNX file, three runtimes
    def imported(self, name: str) -> None:
        from dnnpar.interop import from_onnx
        from dnnpar.nn.summary import summary

        cfg = self.arch[name]
        data, made_by = export_onnx(name, self.torch, cfg)
        path = self.tmp / f"{name}.onnx"
        path.write_bytes(data)
        self.meta[f"{name} ONNX"] = f"{made_by}, input {cfg['in_shape']}, {len(data) / 1e6:.2f} MB"
        model = from_onnx(data)
        tm = torch_from_onnx_arch(self.torch, name, cfg) if self.torch is not None else None
        sess = None
        if self.ort is not None:
            so = self.ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
            sess = self.ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        macs = sum(r.macs for r in summary(model).rows)
        label = f"{ARCH_NAMES[name]} {cfg['in_shape'][1]}x{cfg['in_shape'][2]}"
        for batch in INFER_BATCHES:
            row = Row(name, label, "inference", batch, flops=2.0 * macs * batch)
            self.rows.append(row)
            x, _ = batch_of(self.rng, cfg["in_shape"], batch)
            model.eval()
            folded = fold_batchnorm(model)  # BN folded into its conv: an inference copy
            got = self.time(row, "dnnpar", lambda: folded.forward(x))
            checks = []
            if tm is not None:
                tm.eval()
                with self.torch.inference_mode():
                    xt = self.torch.from_numpy(x)
                    want = self.time(row, "torch", lambda: tm(xt)).numpy()
                checks.append(f"torch {rel_err(got, want):.0e}")
            if sess is not None:
                ort_out = self.time(row, "ort", lambda: sess.run(None, {"x": x})[0])
                checks.append(f"ORT {rel_err(got, ort_out):.0e}")
            row.check = ", ".join(checks)
        for batch in TRAIN_BATCHES:
            row = Row(name, label, "train step", batch, flops=training_flops(model) * batch)
            self.rows.append(row)
            xb, yb = batch_of(self.rng, cfg["in_shape"], batch)
            self.train_rows(row, from_onnx(data), torch_from_onnx_arch(self.torch, name, cfg)
                            if self.torch is not None else None, xb, yb,
                            dict(kind="onnx", name=name, cfg=cfg, onnx=str(path), batch=batch))
            row.note = "ORT: inference only (no training in the CPU package)"

    def train_rows(self, row, model, tm, xb, yb, spec) -> None:
        loss = self.time(row, "dnnpar", lambda s=dnnpar_step(model): s(xb, yb))
        if tm is not None:
            t_loss = self.time(row, "torch", lambda s=torch_step(self.torch, tm): s(xb, yb))
            row.check = f"first-step loss {loss:.4f} vs torch {t_loss:.4f}"
        if not self.args.no_rss:
            for fw in ("dnnpar",) + (("torch",) if tm is not None else ()):
                r = measure_rss({**spec, "framework": fw, "threads": self.threads})
                if r is not None:
                    row.rss[fw] = r

    # ---- the zoo: dnnpar's models against their torch_definition twins
    def zoo(self, name: str, kwargs: dict, batch: int) -> None:
        from dnnpar.nn.models import build

        model = build(name, **kwargs)
        h, w = model.input_shape[1:]
        label = model.name if model.name.startswith("mobilenet") else f"{model.name} {h}x{w}"
        row = Row("zoo", label, "train step", batch, flops=training_flops(model) * batch)
        self.rows.append(row)
        xb, yb = batch_of(self.rng, model.input_shape, batch)
        tm = torch_twin(self.torch, model) if self.torch is not None else None
        if tm is not None:
            model.eval()
            tm.eval()
            with self.torch.inference_mode():
                err = rel_err(model.forward(xb), tm(self.torch.from_numpy(xb)).numpy())
        self.train_rows(row, model, tm, xb, yb, dict(kind="zoo", name=name, kwargs=kwargs, batch=batch))
        if tm is not None:
            row.check = f"logits {err:.0e}; {row.check}"

    # ---- output
    def table_cells(self) -> list[list[str]]:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        out = []
        for r in self.rows:
            missing = {"torch": "no torch" if self.torch is None else "-", "ort": "no ORT" if self.ort is None else "-"}
            ms = [num(r.ms(fw), ",.1f") if r.ms(fw) is not None else missing.get(fw, "-") for fw in FRAMEWORKS]
            ratios = ["-" if r.ratio(fw) is None else f"{r.ratio(fw):.2f}x" for fw in ("torch", "ort")]
            rates = " | ".join(num(r.gflops(fw), ",.1f") for fw in FRAMEWORKS)
            rss = " | ".join("-" if fw not in r.rss else f"{r.rss[fw]['peak_mb']:,.0f} (+{r.rss[fw]['peak_mb'] - r.rss[fw]['before_mb']:,.0f})"
                             for fw in ("dnnpar", "torch")) if r.rss else "-"
            busy = [f"{fw} {c:.1f}" for fw, c in r.other_cores.items() if c is not None and c > 0.2]
            noisy = f"NOISY: other processes busy on {', '.join(busy)} cores" if busy else ""
            check = "; ".join(s for s in (r.check, r.note, noisy) if s) or "-"
            out.append([r.model, r.step, str(r.batch), *ms, *ratios, rates, rss, check])
        return out

    def header_lines(self) -> list[str]:
        return ["dnnpar whole-model benchmark: numpy backend vs PyTorch CPU and ONNX Runtime CPU"] + \
            [f"{k}: {v}" for k, v in self.meta.items()]

    def footnotes(self) -> list[str]:
        return [
            "ms: median of the timed runs (time.perf_counter around each call after warm-up, as many runs as fit in "
            f"{self.budget_s:g} s, at least 3, at most {self.repeat}). dnnpar runs first, then torch, then ORT.",
            "dnnpar/torch, dnnpar/ORT: dnnpar ms / peer ms (below 1: dnnpar is faster).",
            "GFLOP/s: inference 2*MACs per image; train step 2*MACs forward + 2*MACs weight gradients + 2*MACs input "
            "gradients (none for the first layer) per image; compare with the measured peak in the header.",
            "train step: forward + softmax cross-entropy + backward + SGD (lr 0.01, momentum 0.9, weight decay 5e-4) "
            "on one random batch; BatchNorm in training mode (batch statistics).",
            f"peak RSS: VmHWM (/proc/self/status) of a fresh process per framework that builds the "
            f"model and takes 1 + {RSS_STEPS} steps (imports included); (+N): the increase over its resident set "
            "just before the first step.",
            "check: inference: max relative error of dnnpar's output against torch's and ORT's; zoo: the initial "
            "models' logits; train: each framework's first-step loss.",
            "NOISY: other processes kept more than 0.2 cores busy during that framework's runs (/proc/stat less this "
            "process). On a shared machine every number here is noisy: rerun on a quiet one before quoting it.",
        ]

    def finish(self) -> None:
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)  # the exported ONNX files (JSON and markdown say how they were made)

    def text(self) -> str:
        return render_text(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT, self.footnotes())

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        return write_report(out_dir, "models-numpy",
                            render_markdown(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT,
                                            self.footnotes()),
                            {"meta": self.meta, "rows": [asdict(r) for r in self.rows]})


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out", help="folder for the markdown table and the JSON (default: bench-out/)")
    ap.add_argument("--quick", action="store_true", help="at most 5 runs and a 1 s budget per measurement")
    ap.add_argument("--only", nargs="+", choices=("resnet", "mobilenet_v2", *(z[0] for z in ZOO + LARGE)),
                    help="run only these models (the --large ones need --large too)")
    ap.add_argument("--large", action="store_true",
                    help="add the ImageNet-sized training steps: AlexNet (batch 8), VGG-16 224x224 (batch 2), "
                         "MobileNet v1 224x224 (batch 8); minutes")
    ap.add_argument("--threads", type=int, help="threads for torch and onnxruntime (default: this machine's cores)")
    ap.add_argument("--repeat", type=int, help="most timed runs per measurement (default 20, --quick 5)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return 0
    return run_and_report(ModelsBench(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
