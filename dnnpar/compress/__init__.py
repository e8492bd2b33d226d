"""Deep Compression: pruning, CSR with relative indices, weight sharing, Huffman coding, .dnnz files."""
