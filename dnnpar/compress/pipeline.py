"""The Deep Compression pipeline: prune and retrain, share weights and fine-tune centroids,
encode, write a .dnnz; and load a .dnnz back as a model that runs from the compressed form."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .. import ops
from ..backend import get_backend
from ..nn import Sequential
from ..nn.base import Layer
from ..nn.conv import Conv2d, DepthwiseConv2d
from ..nn.layers import Linear
from ..nn.models import build
from ..nn.optim import SGD
from ..sparse import CSR
from ..train import TrainConfig, evaluate, train
from . import container, prune, quantize
from .encode import LayerCode, Report, encode_layer
from .huffman import HuffmanTable
from .relative_csr import RelativeCSR

FORMAT = "dnnz-deep-compression"
FORMAT_VERSION = 1


@dataclass
class CompressConfig:
    """Defaults follow Deep Compression: 8-bit conv / 5-bit fc weights and indices of 8 / 5 bits."""
    quality: dict | float = 1.0          # per-layer threshold = quality x std of the layer's weights
    cycles: int = 3                      # prune -> retrain cycles, quality raised linearly to its final value
    retrain_epochs: int = 2
    finetune_epochs: int = 2
    conv_bits: int = 8
    fc_bits: int = 5
    conv_index_bits: int = 8
    fc_index_bits: int = 5
    init: str = "linear"
    lr: float = 0.005                    # retraining after each prune cycle
    finetune_lr: float = 1e-4            # centroid steps: a centroid's gradient sums all its members'
    weight_decay: float = 5e-4           # L2 during retraining, as in Han et al. 2015
    batch_size: int = 64
    seed: int = 0
    bits: dict = field(default_factory=dict)        # per-layer override: {"fc1": 4}
    index_bits: dict = field(default_factory=dict)  # per-layer override

    def validate(self, model: Sequential):
        for what, v in (("conv_bits", self.conv_bits), ("fc_bits", self.fc_bits),
                        ("conv_index_bits", self.conv_index_bits), ("fc_index_bits", self.fc_index_bits),
                        *(("bits " + k, b) for k, b in self.bits.items()),
                        *(("index_bits " + k, b) for k, b in self.index_bits.items())):
            if not isinstance(v, int) or not 1 <= v <= 16:
                raise ValueError(f"{what} must be an integer in 1..16, got {v!r}")
        names = prune.prunable_layers(model)
        for k in (*self.bits, *self.index_bits, *(self.quality if isinstance(self.quality, dict) else {})):
            if k not in names:
                raise ValueError(f"{model.name} has no prunable layer {k!r} (it has {', '.join(names)})")
        quals = self.quality.values() if isinstance(self.quality, dict) else [self.quality]
        if any(not q > 0 for q in quals):
            raise ValueError(f"pruning quality must be > 0, got {self.quality}")
        if self.cycles < 1:
            raise ValueError("cycles must be >= 1")

    def layer_bits(self, model: Sequential) -> dict[str, tuple[int, int]]:
        out = {}
        for n in prune.prunable_layers(model):
            conv = isinstance(model[n], (Conv2d, DepthwiseConv2d))
            out[n] = (self.bits.get(n, self.conv_bits if conv else self.fc_bits),
                      self.index_bits.get(n, self.conv_index_bits if conv else self.fc_index_bits))
        return out


def compress(model: Sequential, data, cfg: CompressConfig, out=print, progress: bool = False):
    """Run the whole pipeline on a trained model (modified in place). Returns (codes, report, log)
    where log holds the accuracy after each stage."""
    cfg.validate(model)
    be = get_backend()
    # each retraining stage restarts a per-epoch cosine schedule from cfg.lr (constant for a
    # one-epoch stage), so later epochs of a stage take smaller steps
    tcfg = TrainConfig(model=model.name, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, schedule="cosine")
    log = {"baseline": evaluate(model, data.x_test, data.y_test)}
    out(f"baseline test accuracy {100 * log['baseline']:.2f}%")
    names = prune.prunable_layers(model)
    stds = {n: float(be.to_numpy(model[n].params["weight"]).std()) for n in names}
    final_q = prune.per_layer(model, cfg.quality)
    masks = {}
    for c in range(1, cfg.cycles + 1):
        q = {n: final_q[n] * c / cfg.cycles for n in names}
        masks = prune.magnitude_masks(model, q, stds)
        prune.apply_masks(model, masks)
        kept = prune.kept_fraction(model)
        acc_pruned = evaluate(model, data.x_test, data.y_test)
        opt = SGD(model, cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        opt.masks = {k: be.asarray(v) for k, v in masks.items()}
        if cfg.retrain_epochs:
            train(replace(tcfg, epochs=cfg.retrain_epochs, lr=cfg.lr), model=model, optimizer=opt, data=data,
                  out=lambda s: None, progress=progress)
        acc = log["pruned"] = evaluate(model, data.x_test, data.y_test)
        out(f"prune cycle {c}/{cfg.cycles}: kept " + ", ".join(f"{n} {100 * kept[n]:.1f}%" for n in names)
            + f"; accuracy {100 * acc_pruned:.2f}% pruned -> {100 * acc:.2f}% retrained")
    bits = cfg.layer_bits(model)
    shared = quantize.share_weights(model, {n: b for n, (b, _) in bits.items()}, cfg.init, cfg.seed)
    log["quantized"] = evaluate(model, data.x_test, data.y_test)
    if cfg.finetune_epochs:
        opt = quantize.CentroidSGD(model, shared, cfg.finetune_lr, momentum=0.9)
        train(replace(tcfg, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr), model=model, optimizer=opt, data=data,
              out=lambda s: None, progress=progress)
    log["final"] = evaluate(model, data.x_test, data.y_test)
    out(f"weight sharing: {100 * log['quantized']:.2f}% after k-means, {100 * log['final']:.2f}% after centroid "
        f"fine-tuning")
    codes = [encode_layer(n, shared[n], bits[n][1],
                          be.to_numpy(model[n].params["bias"]) if "bias" in model[n].params else None) for n in names]
    return codes, Report(model.name, codes, other_params(model)), log


def other_params(model: Sequential) -> int:
    names = set(prune.prunable_layers(model))
    return int(sum(p.size for n, p, _ in model.named_parameters() if n.split(".")[0] not in names
                   ) + sum(b.size for _, b in model.named_buffers()))


# ---------------------------------------------------------------------- .dnnz
def save(path, model: Sequential, codes: list[LayerCode], model_kwargs: dict | None = None, meta: dict | None = None):
    """Write the compressed model (atomically). Layers outside ``codes`` are stored as float32."""
    be = get_backend()
    compressed = {c.name for c in codes}
    header = {"format": FORMAT, "version": FORMAT_VERSION, "model": model.name, "builder": _builder_name(model), "kwargs": model_kwargs or {}, "meta": meta or {},
              "layers": [{"name": c.name, "shape": list(c.shape), "weight_bits": c.weight_bits,
                          "index_bits": c.index_bits, "entries": c.csr.entries, "code_nbits": c.code_nbits,
                          "rel_nbits": c.rel_nbits, "has_bias": c.bias is not None} for c in codes]}
    sections = {}
    for c in codes:
        sections[f"{c.name}/codebook"] = c.codebook
        sections[f"{c.name}/rows"] = c.row_counts()
        sections[f"{c.name}/codes.table"] = c.code_table.to_bytes()
        sections[f"{c.name}/codes"] = c.code_stream
        sections[f"{c.name}/rel.table"] = c.rel_table.to_bytes()
        sections[f"{c.name}/rel"] = c.rel_stream
        if c.bias is not None:
            sections[f"{c.name}/bias"] = c.bias
    for n, p, _ in model.named_parameters():
        if n.split(".")[0] not in compressed:
            sections[f"param/{n}"] = np.ascontiguousarray(be.to_numpy(p), np.float32)
    for n, b in model.named_buffers():
        sections[f"param/{n}"] = np.ascontiguousarray(be.to_numpy(b), np.float32)
    container.write(path, header, sections)


def _builder_name(model: Sequential) -> str:
    for key in ("lenet300", "lenet5", "alexnet", "vgg16", "mobilenet_v1"):
        if model.name.startswith(key):
            return key
    raise ValueError(f"cannot save {model.name!r}: only models of the zoo (dnnpar.nn.models) can be rebuilt on load")


def read_codes(path) -> tuple[dict, list[LayerCode], dict]:
    """Decode a .dnnz: (header, layer codes, other float32 arrays). Every inconsistency is a
    container.DnnzError naming the file and the layer."""
    header, sections = container.read(path)
    err = container.DnnzError
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise err(f"{path}: not a dnnpar compressed model (format {header.get('format')!r} v{header.get('version')})")
    codes = []
    try:
        for meta in header["layers"]:
            name, shape = meta["name"], tuple(int(s) for s in meta["shape"])
            wb, ib, entries = int(meta["weight_bits"]), int(meta["index_bits"]), int(meta["entries"])
            if not (1 <= wb <= 16 and 1 <= ib <= 16 and entries >= 0 and len(shape) in (2, 4) and min(shape) >= 1):
                raise err(f"{path}: layer {name}: invalid bit widths or shape")

            def section(key, _name=name):
                if f"{_name}/{key}" not in sections:
                    raise err(f"{path}: layer {_name}: missing section {key!r}")
                return sections[f"{_name}/{key}"]
            code_table = HuffmanTable.from_bytes(section("codes.table"))
            rel_table = HuffmanTable.from_bytes(section("rel.table"))
            if code_table.lengths.size != 1 << wb or rel_table.lengths.size != 1 << ib:
                raise err(f"{path}: layer {name}: code tables do not match {wb}/{ib} bits")
            cstream, rstream = section("codes"), section("rel")
            c = code_table.decode(cstream, int(meta["code_nbits"]), entries)
            r = rel_table.decode(rstream, int(meta["rel_nbits"]), entries)
            counts = np.asarray(section("rows"))
            rows = shape[0]
            cols = int(np.prod(shape[1:]))
            if counts.shape != (rows,) or counts.dtype.kind != "u" or int(counts.sum(dtype=np.int64)) != entries:
                raise err(f"{path}: layer {name}: row lengths do not add up to its {entries} entries")
            indptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
            csr = RelativeCSR((rows, cols), ib, indptr, r.astype(np.uint16), c.astype(np.uint16))
            csr.columns()  # raises on relative indices that run past the row
            codebook = np.asarray(section("codebook"), np.float32)
            if codebook.shape != (1 << wb,):
                raise err(f"{path}: layer {name}: codebook of {codebook.shape} for {wb}-bit weights")
            bias = np.asarray(section("bias"), np.float32) if meta.get("has_bias") else None
            if bias is not None and bias.shape != (rows,):
                raise err(f"{path}: layer {name}: bias of shape {bias.shape} for {rows} outputs")
            codes.append(LayerCode(name, shape, wb, ib, csr, codebook, code_table, rel_table, bytes(cstream),
                                   int(meta["code_nbits"]), bytes(rstream), int(meta["rel_nbits"]), bias))
    except (KeyError, TypeError) as e:
        raise err(f"{path}: malformed layer metadata ({e})") from e
    except ValueError as e:
        if isinstance(e, err):
            raise
        raise err(f"{path}: {e}") from e
    others = {k[len("param/"):]: np.asarray(v, np.float32) for k, v in sections.items() if k.startswith("param/")}
    return header, codes, others


class CompressedLinear(Layer):
    """A fully connected layer run straight from its compressed form: CSR whose values are uint8
    indices into the layer's codebook (dp.ops.spmv for one sample, dp.ops.spmm for a batch).
    Inference only."""

    def __init__(self, csr: CSR, bias, in_features: int, out_features: int):
        super().__init__()
        self.csr, self.in_features, self.out_features = csr, in_features, out_features
        if bias is not None:
            self.params["bias"] = bias

    def forward(self, x):
        be = get_backend()
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"CompressedLinear expects (N, {self.in_features}) input, got {tuple(x.shape)}")
        if x.shape[0] == 1:
            y = ops.spmv(self.csr, be.xp.ascontiguousarray(x[0]))[None, :]
        else:
            y = be.xp.ascontiguousarray(ops.spmm(self.csr, be.xp.ascontiguousarray(x.T)).T)
        if "bias" in self.params:
            y = y + self.params["bias"]
        return y

    def backward(self, dy):
        raise NotImplementedError("compressed layers are for inference; retrain the dense model instead")

    def output_shape(self, in_shape):
        return (self.out_features,)

    def macs(self, in_shape):
        return self.csr.nnz


def load(path, sparse: bool = True) -> Sequential:
    """A model from a .dnnz. With ``sparse`` (default), fully connected layers whose weights use at
    most 8 bits run as CSR x codebook products without being decoded; conv layers (and wider
    codes) are decoded to dense weights. Inference only for the sparse layers."""
    header, codes, others = read_codes(path)
    be = get_backend()
    model = build(header["builder"], **header.get("kwargs", {}))
    for c in codes:
        layer = model[c.name]
        if tuple(layer.params["weight"].shape) != c.shape:
            raise container.DnnzError(f"{path}: layer {c.name} has shape {c.shape} in the file, the model has "
                                      f"{tuple(layer.params['weight'].shape)}")
        if sparse and isinstance(layer, Linear) and c.weight_bits <= 8:
            keep = c.csr.codes != 0  # drop fillers: they hold zeros
            cols = c.csr.columns()[keep]
            counts = np.bincount(np.repeat(np.arange(c.shape[0]), np.diff(c.csr.indptr))[keep], minlength=c.shape[0])
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            csr = CSR(c.csr.codes[keep].astype(np.uint8), cols, indptr, c.shape, codebook=c.codebook)
            bias = be.asarray(c.bias) if c.bias is not None else None
            idx = [n for n, _ in model.layers].index(c.name)
            model.layers[idx] = (c.name, CompressedLinear(csr, bias, c.shape[1], c.shape[0]))
        else:
            layer.params["weight"][...] = be.asarray(c.codebook[c.dense_codes()])
            if c.bias is not None:
                layer.params["bias"][...] = be.asarray(c.bias)
    for n, arr in others.items():
        lname, key = n.rsplit(".", 1)
        layer = model[lname]
        d = layer.params if key in layer.params else layer.buffers
        if key not in d or tuple(d[key].shape) != arr.shape:
            raise container.DnnzError(f"{path}: parameter {n} does not fit the model")
        d[key][...] = be.asarray(arr)
    model.eval()
    return model

