"""Latency-driven slimming: latency tables, their additivity report and the slimming search.

Only the CLI imports this package (``zoo latency-table``, ``zoo slim``). See ``docs/slim.md``.

- `zoo.slim.space`: which blocks a family's architectures are made of (table keys);
- `zoo.slim.table`: `LatencyTable` (JSON files, device CSV/JSON import, provenance);
- `zoo.slim.measure`: timing blocks and networks on torch, onnxruntime or CUDA;
- `zoo.slim.additivity`: whole-network latency against the table's sum, and its calibration;
- `zoo.slim.coreml_blocks`: per-block CoreML packages and a manifest, to measure on a phone;
- `zoo.slim.search`: the paper's greedy slimming with the supernet's importance;
- `zoo.slim.accuracy`: the other importance, the accuracy each action costs on held-out images.
"""
