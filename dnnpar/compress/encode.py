"""From a pruned, quantised layer to the streams written to disk, with exact bit accounting.

Per layer: the weight matrix (rows = output units / filters, columns = inputs x kernel taps) as a
relative-index CSR (``relative_csr``), whose two entry streams — codebook indices and relative
indices — are Huffman-coded separately (``huffman``). The report follows Deep Compression's
Tables 2-5: bits per stored entry before and after Huffman coding, and the compression rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import relative_csr
from .huffman import HuffmanTable
from .quantize import SharedLayer

F32 = 32


@dataclass
class LayerCode:
    name: str
    shape: tuple            # the weight's own shape (O, C, KH, KW) or (out, in)
    weight_bits: int
    index_bits: int
    csr: relative_csr.RelativeCSR
    codebook: np.ndarray    # (2^weight_bits,) float32
    code_table: HuffmanTable
    rel_table: HuffmanTable
    code_stream: bytes
    code_nbits: int
    rel_stream: bytes
    rel_nbits: int
    bias: np.ndarray | None

    # ------------------------------------------------------------------ bit accounting
    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nnz(self) -> int:
        return self.csr.entries - self.csr.fillers

    def row_counts(self) -> np.ndarray:
        """Entries per row, as stored: 16 bits per row when every row fits, else 32."""
        counts = np.diff(self.csr.indptr)
        return counts.astype(np.uint16 if counts.max(initial=0) < 1 << 16 else np.uint32)

    def overhead_bits(self) -> int:
        """What both variants store besides the entry streams: codebook, row lengths, bias."""
        bias = 0 if self.bias is None else self.bias.size * F32
        return self.codebook.size * F32 + self.row_counts().nbytes * 8 + bias

    def bits_pq(self) -> int:
        """Pruning + quantisation: fixed-width codes and relative indices."""
        return self.csr.entries * (self.weight_bits + self.index_bits) + self.overhead_bits()

    def bits_pqh(self) -> int:
        """... + Huffman: the coded streams and their code tables."""
        tables = 8 * (len(self.code_table.to_bytes()) + len(self.rel_table.to_bytes()))
        return self.code_nbits + self.rel_nbits + tables + self.overhead_bits()

    def original_bits(self) -> int:
        return (self.n_weights + (0 if self.bias is None else self.bias.size)) * F32

    def dense_codes(self) -> np.ndarray:
        return relative_csr.decode(self.csr).reshape(self.shape)


def encode_layer(name: str, shared: SharedLayer, index_bits: int, bias: np.ndarray | None) -> LayerCode:
    rows = shared.codes.shape[0]
    csr = relative_csr.encode(shared.codes.reshape(rows, -1).astype(np.uint16), index_bits)
    code_table = HuffmanTable.from_symbols(csr.codes, 1 << shared.bits)
    rel_table = HuffmanTable.from_symbols(csr.rel, 1 << index_bits)
    code_stream, code_nbits = code_table.encode(csr.codes)
    rel_stream, rel_nbits = rel_table.encode(csr.rel)
    return LayerCode(name, tuple(shared.codes.shape), shared.bits, index_bits, csr, shared.codebook.astype(np.float32),
                     code_table, rel_table, code_stream, code_nbits, rel_stream, rel_nbits,
                     None if bias is None else np.asarray(bias, np.float32))


@dataclass
class Report:
    model: str
    layers: list
    other_params: int  # parameters outside the compressed layers (BN, ...), stored as float32

    def totals(self):
        orig = sum(c.original_bits() for c in self.layers) + self.other_params * F32
        pq = sum(c.bits_pq() for c in self.layers) + self.other_params * F32
        pqh = sum(c.bits_pqh() for c in self.layers) + self.other_params * F32
        return orig, pq, pqh

    def table(self) -> str:
        head = (f"{'layer':<9} {'#weights':>10} {'kept':>7} {'w bits':>7} {'w bits':>7} {'idx bits':>8} {'idx bits':>8} "
                f"{'rate':>7} {'rate':>7}")
        sub = (f"{'':<9} {'':>10} {'':>7} {'P+Q':>7} {'P+Q+H':>7} {'P+Q':>8} {'P+Q+H':>8} {'P+Q':>7} {'P+Q+H':>7}")
        lines = [f"{self.model}: Deep Compression (rate = compressed / float32 size, as in Han et al. Tables 2-5)",
                 head, sub, "-" * len(head)]
        for c in self.layers:
            e = max(c.csr.entries, 1)
            lines.append(f"{c.name:<9} {c.n_weights:>10,} {100 * c.nnz / c.n_weights:>6.1f}% {c.weight_bits:>7} "
                         f"{c.code_nbits / e:>7.2f} {c.index_bits:>8} {c.rel_nbits / e:>8.2f} "
                         f"{100 * c.bits_pq() / c.original_bits():>6.2f}% {100 * c.bits_pqh() / c.original_bits():>6.2f}%")
        orig, pq, pqh = self.totals()
        n = sum(c.n_weights for c in self.layers)
        kept = sum(c.nnz for c in self.layers)
        lines.append("-" * len(head))
        lines.append(f"{'total':<9} {n:>10,} {100 * kept / n:>6.1f}% {'':>7} {'':>7} {'':>8} {'':>8} "
                     f"{100 * pq / orig:>6.2f}% {100 * pqh / orig:>6.2f}%")
        lines.append(f"compression: {orig / pq:.1f}x after pruning + quantisation, {orig / pqh:.1f}x with Huffman coding "
                     f"({orig / 8 / 1024:.1f} KiB of float32 -> {pqh / 8 / 1024:.1f} KiB)")
        return "\n".join(lines)

    def ratio(self) -> float:
        orig, _, pqh = self.totals()
        return orig / pqh


def size_model(shapes: dict, density: dict, weight_bits: dict, index_bits: dict, seed: int = 0):
    """P+Q bits of random layers at given densities (no training): Deep Compression's storage
    arithmetic with real fillers. Returns (original bits, P+Q bits) over the weights."""
    rng = np.random.default_rng(seed)
    orig = pq = 0
    for name, shape in shapes.items():
        rows, cols = shape[0], int(np.prod(shape[1:]))
        codes = (rng.random((rows, cols)) < density[name]).astype(np.uint16)
        csr = relative_csr.encode(codes, index_bits[name])
        orig += rows * cols * F32
        pq += csr.entries * (weight_bits[name] + index_bits[name]) + (1 << weight_bits[name]) * F32 + (rows + 1) * F32
    return orig, pq


def plot_histograms(before: dict, codes: list, path=None):
    """Per compressed layer: the weight histogram before pruning, the surviving weights after
    compression, and the shared values (codebook) as vertical lines. Returns the matplotlib
    Figure (object API: no global backend switched); written as PNG when ``path`` is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(codes), 3.4))
    axes = fig.subplots(1, len(codes), squeeze=False)[0]
    for ax, c in zip(axes, codes):
        w0 = np.asarray(before[c.name]).ravel()
        kept = c.codebook[c.dense_codes()].ravel()
        kept = kept[kept != 0]
        lo = min(w0.min(), kept.min(initial=0.0), c.codebook[1:].min(initial=0.0))
        hi = max(w0.max(), kept.max(initial=0.0), c.codebook[1:].max(initial=0.0))
        bins = np.linspace(lo, hi, 81)  # retraining can move survivors outside the original range
        ax.hist(w0, bins=bins, color="0.7", label="before pruning")
        ax.hist(kept, bins=bins, color="tab:blue", alpha=0.8, label="after (shared)")
        used = np.unique(c.csr.codes[c.csr.codes != 0])
        for v in c.codebook[used]:  # the shared values some weight uses
            ax.axvline(v, color="tab:red", lw=0.6, alpha=0.7)
        ax.set(title=f"{c.name}: {100 * c.nnz / c.n_weights:.1f}% kept, {c.weight_bits}-bit", xlabel="weight",
               ylabel="count", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
