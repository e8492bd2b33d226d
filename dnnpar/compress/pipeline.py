"""The Deep Compression pipeline: prune and retrain, share weights and fine-tune centroids,
encode, write a .dnnz; and load a .dnnz back as a model that runs from the compressed form."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from .. import ops
from ..backend import get_backend
from ..nn import Sequential
from ..nn.base import Layer
from ..nn.conv import Conv2d, DepthwiseConv2d
from ..nn.layers import Linear
from ..nn.models import MODELS, build
from ..nn.spec import MAX_PARAMETERS, graph_from_spec
from ..nn.optim import SGD
from ..sparse import CSR, CompactCSR, padded_codebook
from ..train import TrainConfig, evaluate, train
from ..errors import DnnzError, SpecError
from . import container, prune, quantize
from .encode import LayerCode, Report, encode_layer
from .header import FORMAT, FORMAT_VERSION, GRAPH, check_sections, described_parameters, parse_header
from .huffman import HuffmanTable
from .relative_csr import RelativeCSR, check_spans


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
    where log holds the test accuracy after each stage (baseline, pruned, quantized, final).

    ``data`` None (no data set fits the model): one-shot compression, pruned straight to the
    final quality and weight-shared, with no retraining, no centroid fine-tuning and no accuracy
    measured (log is empty); cycles and epochs are then not used."""
    cfg.validate(model)
    be = get_backend()
    names = prune.prunable_layers(model)
    stds = {n: float(be.to_numpy(model[n].params["weight"]).std()) for n in names}
    final_q = prune.per_layer(model, cfg.quality)
    bits = cfg.layer_bits(model)
    if data is None:
        prune.apply_masks(model, prune.magnitude_masks(model, final_q, stds))
        kept = prune.kept_fraction(model)
        out("one-shot compression (no data set fits the model): pruned to the final quality, kept "
            + ", ".join(f"{n} {100 * kept[n]:.1f}%" for n in names) + "; weight sharing without retraining or "
            "fine-tuning; accuracy not measured")
        shared = quantize.share_weights(model, {n: b for n, (b, _) in bits.items()}, cfg.init, cfg.seed)
        log = {}
    else:
        shared, log = _compress_retrained(model, data, cfg, names, stds, final_q, bits, out, progress)
    codes = [encode_layer(n, shared[n], bits[n][1],
                          be.to_numpy(model[n].params["bias"]) if "bias" in model[n].params else None) for n in names]
    return codes, Report(model.name, codes, other_params(model)), log


def _compress_retrained(model, data, cfg, names, stds, final_q, bits, out, progress):
    """Prune -> retrain cycles, weight sharing and centroid fine-tuning on ``data``:
    (shared layers, log of accuracies)."""
    be = get_backend()
    # each retraining stage restarts a per-epoch cosine schedule from cfg.lr (constant for a
    # one-epoch stage), so later epochs of a stage take smaller steps
    tcfg = TrainConfig(model=model.name, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, schedule="cosine")
    log = {"baseline": evaluate(model, data.x_test, data.y_test)}
    out(f"baseline test accuracy {100 * log['baseline']:.2f}%")
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
    shared = quantize.share_weights(model, {n: b for n, (b, _) in bits.items()}, cfg.init, cfg.seed)
    log["quantized"] = evaluate(model, data.x_test, data.y_test)
    if cfg.finetune_epochs:
        opt = quantize.CentroidSGD(model, shared, cfg.finetune_lr, momentum=0.9)
        train(replace(tcfg, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr), model=model, optimizer=opt, data=data,
              out=lambda s: None, progress=progress)
    log["final"] = evaluate(model, data.x_test, data.y_test)
    out(f"weight sharing: {100 * log['quantized']:.2f}% after k-means, {100 * log['final']:.2f}% after centroid "
        f"fine-tuning")
    return shared, log


def other_params(model: Sequential) -> int:
    names = set(prune.prunable_layers(model))
    return int(sum(p.size for n, p, _ in model.named_parameters() if n.split(".")[0] not in names
                   ) + sum(b.size for _, b in model.named_buffers()))


# ---------------------------------------------------------------------- .dnnz
def save(path, model: Sequential, codes: list[LayerCode], model_kwargs: dict | None = None, meta: dict | None = None):
    """Write the compressed model (atomically). Layers outside ``codes`` are stored as float32.

    A zoo model (``dnnpar.nn.models``) is stored by its builder's name and ``model_kwargs``;
    any other :class:`~dnnpar.nn.base.Graph` (an imported ONNX model) with its graph spec
    (builder ``"graph"``), from which :func:`load` rebuilds it. The header is checked with the
    reader's own schema first (ValueError naming the field), so this never writes a file
    :func:`load` would refuse for its header or sections."""
    be = get_backend()
    compressed = {c.name for c in codes}
    builder = _builder_name(model, model_kwargs)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "model": model.name, "builder": builder,
              "kwargs": model_kwargs or {}, "meta": meta or {},
              "layers": [{"name": c.name, "shape": [int(s) for s in c.shape], "weight_bits": int(c.weight_bits),
                          "index_bits": int(c.index_bits), "entries": int(c.csr.entries),
                          "code_nbits": int(c.code_nbits), "rel_nbits": int(c.rel_nbits),
                          "has_bias": c.bias is not None} for c in codes]}
    if builder == GRAPH:
        header["graph"] = model.spec()
    sections = {}
    for c in codes:
        sections[f"{c.name}/codebook"] = np.ascontiguousarray(c.codebook, np.float32)
        sections[f"{c.name}/rows"] = c.row_counts()
        sections[f"{c.name}/codes.table"] = c.code_table.to_bytes()
        sections[f"{c.name}/codes"] = bytes(c.code_stream)
        sections[f"{c.name}/rel.table"] = c.rel_table.to_bytes()
        sections[f"{c.name}/rel"] = bytes(c.rel_stream)
        if c.bias is not None:
            sections[f"{c.name}/bias"] = np.ascontiguousarray(c.bias, np.float32)
    for n, p, _ in model.named_parameters():
        if n.split(".")[0] not in compressed:
            sections[f"param/{n}"] = np.ascontiguousarray(be.to_numpy(p), np.float32)
    for n, b in model.named_buffers():
        sections[f"param/{n}"] = np.ascontiguousarray(be.to_numpy(b), np.float32)
    try:
        hdr = parse_header(json.loads(json.dumps(header, allow_nan=False)))
        check_sections(hdr, sections)
    except DnnzError as e:
        raise ValueError(f"cannot save {model.name}: {e}") from None
    container.write(path, header, sections)


def _builder_name(model: Sequential, model_kwargs: dict | None = None) -> str:
    """The header's builder for ``model``: the zoo builder its name starts with when that
    builder, given ``model_kwargs``, builds a model of exactly this structure (same spec), else
    "graph" (the spec is stored). Given ``model_kwargs`` the model must be that zoo model."""
    key = next((k for k in MODELS if model.name.startswith(k)), None)
    if key is not None:
        try:
            same = build(key, **(model_kwargs or {})).spec() == model.spec()
        except (TypeError, ValueError):
            same = False
        if same:
            return key
    if model_kwargs is not None:
        raise ValueError(f"cannot save {model.name!r} with model_kwargs {model_kwargs}: they do not build it with a "
                         "zoo builder (dnnpar.nn.models); leave them out to store the model's graph")
    return GRAPH
def _decode_layer(m, sections: dict, path) -> LayerCode:
    """One layer's streams, decoded and checked against its validated header entry ``m``."""
    field = f"layers.{m.name}"
    try:
        code_table = HuffmanTable.from_bytes(sections[f"{m.name}/codes.table"])
        rel_table = HuffmanTable.from_bytes(sections[f"{m.name}/rel.table"])
    except ValueError as e:
        raise DnnzError(f"bad Huffman table ({e})", path, field) from None
    if code_table.lengths.size != 1 << m.weight_bits or rel_table.lengths.size != 1 << m.index_bits:
        raise DnnzError(f"code tables of {code_table.lengths.size} / {rel_table.lengths.size} symbols do not match "
                        f"{m.weight_bits} / {m.index_bits} bits", path, field)
    cstream, rstream = sections[f"{m.name}/codes"], sections[f"{m.name}/rel"]
    try:
        c = code_table.decode(cstream, m.code_nbits, m.entries)
        r = rel_table.decode(rstream, m.rel_nbits, m.entries)
    except ValueError as e:
        raise DnnzError(f"corrupt entry stream ({e})", path, field) from None
    counts = sections[f"{m.name}/rows"]
    if int(counts.sum(dtype=np.int64)) != m.entries:
        raise DnnzError(f"row lengths add up to {int(counts.sum(dtype=np.int64))}, not the layer's {m.entries} entries",
                        path, field)
    indptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    # streams of at most 8 bits are kept as bytes: the native kernel's form takes them as they are
    csr = RelativeCSR((m.rows, m.cols), m.index_bits, indptr, r.astype(np.uint8 if m.index_bits <= 8 else np.uint16),
                      c.astype(np.uint8 if m.weight_bits <= 8 else np.uint16))
    try:
        check_spans(csr.indptr, csr.rel, m.cols)
    except ValueError as e:
        raise DnnzError(str(e), path, field) from None
    # fillers (code 0) stand for the longest gap and only ever precede a stored weight of the
    # same row: anything else is not what the encoder writes and would decode ambiguously
    fill = csr.codes == 0
    max_gap = (1 << m.index_bits) - 1
    if np.any(csr.rel[fill] != max_gap):
        raise DnnzError(f"a filler entry (code 0) skips fewer than {max_gap} zeros", path, field)
    ends = indptr[1:][counts > 0] - 1
    if np.any(fill[ends]):
        raise DnnzError("a row ends with a filler entry (code 0)", path, field)
    bias = sections.get(f"{m.name}/bias")
    return LayerCode(m.name, m.shape, m.weight_bits, m.index_bits, csr, np.asarray(sections[f"{m.name}/codebook"]),
                     code_table, rel_table, bytes(cstream), m.code_nbits, bytes(rstream), m.rel_nbits,
                     None if bias is None else np.asarray(bias))


def read_codes(path) -> tuple[dict, list[LayerCode], dict]:
    """Decode a .dnnz: (header dict, layer codes, other float32 arrays). The header is validated
    against its schema (``header.py``) and every stream against the header before anything is
    decoded; every problem is a DnnzError naming the file and the field or layer."""
    raw, sections = container.read(path)
    hdr = parse_header(raw, path)
    check_sections(hdr, sections, path)
    codes = [_decode_layer(m, sections, path) for m in hdr.layers]
    others = {k[len("param/"):]: np.asarray(v) for k, v in sections.items() if k.startswith("param/")}
    return raw, codes, others


def _spec_error(e: SpecError, cap: int, path) -> DnnzError:
    """A SpecError of the header's graph as a DnnzError naming ``graph.<its field>``."""
    what = str(e)
    if e.field and what.startswith(f"{e.field}: "):
        what = what[len(e.field) + 2:]
    return DnnzError(f"does not describe a buildable model ({what}; the file's layer entries and param/ sections "
                     f"describe {cap} parameters and buffers)", path, f"graph.{e.field}" if e.field else "graph")


def _build(hdr, others: dict, path) -> Sequential:
    """The model the validated header describes, checked against the header's layers: the zoo
    model of its builder and kwargs, or the graph of its spec, checked by graph_from_spec before
    anything is built, under a parameter cap of what the file describes (``others``: its
    ``param/`` arrays; see header.described_parameters)."""
    if hdr.builder == GRAPH:
        cap = min(MAX_PARAMETERS, described_parameters(hdr, others))
        try:
            model = graph_from_spec(hdr.graph, max_parameters=cap)
        except SpecError as e:
            raise _spec_error(e, cap, path) from None
        if model.name != hdr.model:
            raise DnnzError(f"the graph spec builds {model.name!r}, the header says {hdr.model!r}", path, "model")
    else:
        try:
            model = build(hdr.builder, **hdr.kwargs)
        except ValueError as e:
            raise DnnzError(f"{hdr.builder} cannot be built from these arguments ({e})", path, "kwargs") from None
        if model.name != hdr.model:
            raise DnnzError(f"{hdr.builder} with kwargs {hdr.kwargs} builds {model.name!r}, the header says "
                            f"{hdr.model!r}", path, "model")
    names = prune.prunable_layers(model)
    listed = [m.name for m in hdr.layers]
    if sorted(listed) != sorted(names):
        missing, extra = sorted(set(names) - set(listed)), sorted(set(listed) - set(names))
        raise DnnzError(f"must list every prunable layer of {model.name} once (missing {missing}, not in the model "
                        f"{extra})", path, "layers")
    for m in hdr.layers:
        layer = model[m.name]
        if tuple(layer.params["weight"].shape) != m.shape:
            raise DnnzError(f"shape {m.shape} in the file, the model's is {tuple(layer.params['weight'].shape)}",
                            path, f"layers.{m.name}.shape")
        if ("bias" in layer.params) != m.has_bias:
            raise DnnzError(f"has_bias is {str(m.has_bias).lower()} but {m.name} of {model.name} "
                            f"{'has' if 'bias' in layer.params else 'has no'} bias", path, f"layers.{m.name}.has_bias")
    return model


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


def sparse_weight(c: LayerCode) -> CSR:
    """The CSR x codebook matrix of a decoded fully connected layer of at most 8-bit codes. With
    relative indices of at most 8 bits its compact form (the native CPU kernel's) is the file's
    entry streams themselves: relative indices as gaps, codes, entry row starts, fillers being
    code 0 (codebook[0] = 0.0, checked by the reader); no absolute column is decoded and
    nothing re-encoded (:meth:`CSR.from_compact`). Wider relative indices do not fit the
    kernel's bytes: those layers are decoded to absolute columns (the kernel's form is then
    encoded from them on first use)."""
    r = c.csr
    if r.rel.dtype == np.uint8:
        for a in (r.indptr, r.rel, r.codes):
            a.flags.writeable = False
        return CSR.from_compact(CompactCSR(tuple(r.shape), r.indptr, r.rel, r.codes, padded_codebook(c.codebook),
                                           r.fillers, 0 if r.fillers else -1), c.codebook.shape[0])
    keep = r.codes != 0  # drop fillers: they hold zeros
    counts = np.bincount(np.repeat(np.arange(r.shape[0]), np.diff(r.indptr))[keep], minlength=r.shape[0])
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return CSR(r.codes[keep].astype(np.uint8), r.columns()[keep], indptr, r.shape, codebook=c.codebook)


def load(path, sparse: bool = True) -> Sequential:
    """A model from a .dnnz: the zoo model or the graph (builder "graph") its header describes,
    every parameter and buffer from the file. With ``sparse`` (default), fully connected layers
    whose weights use at most 8 bits run as CSR x codebook products without being decoded; conv
    layers (and wider codes) are decoded to dense weights. Inference only for the sparse layers."""
    header, codes, others = read_codes(path)
    be = get_backend()
    model = _build(parse_header(header, path), others, path)
    # every parameter and buffer comes from the file: none keeps its random initial value
    compressed = {c.name for c in codes}
    wanted = {f"{ln}.{k}": d for ln, layer in model.layers if ln not in compressed
              for d in (layer.params, layer.buffers) for k in d}
    wanted.update({f"{ln}.{k}": layer.buffers for ln, layer in model.layers if ln in compressed
                   for k in layer.buffers})
    missing, extra = sorted(set(wanted) - set(others)), sorted(set(others) - set(wanted))
    if missing or extra:
        raise DnnzError(f"param/ sections do not match {model.name} (missing {missing[:5]}, unexpected "
                        f"{extra[:5]})", path, "sections")
    for n, arr in others.items():
        d, key = wanted[n], n.rsplit(".", 1)[1]
        if tuple(d[key].shape) != arr.shape:
            raise DnnzError(f"shape {arr.shape}, the model's is {tuple(d[key].shape)}", path, f"section 'param/{n}'")
    for c in codes:
        layer = model[c.name]
        if sparse and isinstance(layer, Linear) and c.weight_bits <= 8:
            csr = sparse_weight(c)
            bias = be.asarray(c.bias) if c.bias is not None else None
            idx = [n for n, _ in model.layers].index(c.name)
            model.layers[idx] = (c.name, CompressedLinear(csr, bias, c.shape[1], c.shape[0]))
        else:
            layer.params["weight"][...] = be.asarray(c.codebook[c.dense_codes()])
            if c.bias is not None:
                layer.params["bias"][...] = be.asarray(c.bias)
    for n, arr in others.items():
        wanted[n][n.rsplit(".", 1)[1]][...] = be.asarray(arr)
    model.eval()
    return model

