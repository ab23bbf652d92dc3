"""LiteMedSAM's image encoder on CPU runtimes: seconds per slice and agreement with torch.

The same real slices for every runtime: the axial slices of one dev case's five structures
(ground-truth boxes), windowed and cropped as the pipeline does. Per runtime: conversion / load
time, seconds per slice (one slice per call; torch also in batches of 4; after a warm-up), the largest embedding
difference from torch, and the Dice between the masks decoded (in torch) from the runtime's and
from torch's embeddings.

    python benchmarks/runtimes.py --shared ../shared --out docs/bench/runtimes
"""
from __future__ import annotations

import time

import numpy as np
import torch

from MedLSAMLib.geometry import slice_boxes
from MedLSAMLib.preprocess import SAM_WINDOW, window_to_uint8
from MedLSAMLib.segment.backends import LiteMedSAM
from MedLSAMLib.segment.slices import axes, crop_window, get_slice

from harness import CORE5, Bench, arguments, machine, write_results  # benchmarks/ is on sys.path when run as a script


def real_slices(ct, labels, limit: int):
    """(cropped windowed slice, boxes on it) for the slices of the case's structures."""
    ax, _, _ = axes(ct.geometry)
    per_slice = {}
    for value, _ in CORE5:
        kji = np.argwhere(labels.array == value)
        if len(kji):
            box = [kji.min(0)[::-1].tolist(), kji.max(0)[::-1].tolist()]
            for s, b in slice_boxes([box], ct.geometry).items():
                per_slice.setdefault(s, []).append(b)
    out = []
    for s in sorted(per_slice)[:limit]:
        full = get_slice(ct.array, ax, s)
        r0, c0, r1, c1 = crop_window(per_slice[s], full.shape, 1.5, 0.375)
        boxes = [(u0 - c0, v0 - r0, u1 - c0, v1 - r0) for u0, v0, u1, v1 in per_slice[s]]
        out.append((window_to_uint8(full[r0:r1 + 1, c0:c1 + 1], SAM_WINDOW), boxes))
    return out


def openvino_encoder(module, size, threads: int):
    """The encoder converted by OpenVINO (batch of one, float32): the other candidate
    (pip install openvino)."""
    import openvino as ov

    with torch.no_grad():
        model = ov.convert_model(module.eval(), example_input=torch.zeros(1, 3, size, size))
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads})
    return lambda x: torch.cat([torch.from_numpy(np.asarray(compiled(x[n:n + 1].numpy())[0])) for n in range(len(x))])


def main():
    ap = arguments(__doc__, "docs/bench/runtimes", limit=None)
    ap.add_argument("--case", default="validation-pats/pt_201")
    ap.add_argument("--slices", type=int, default=40)
    args = ap.parse_args()
    bench = Bench(args, "runtimes")
    threads = torch.get_num_threads()
    ct, labels = bench.case(args.case)
    slices = real_slices(ct, labels, args.slices)
    seg = LiteMedSAM.load("cpu")
    work = bench.work

    def build(name):
        t0 = time.perf_counter()
        if name.startswith("torch"):
            seg.use_runtime("torch")
        elif name.startswith("onnxruntime"):  # the shipped path: export on first use, then the cache
            seg.use_runtime("onnxruntime", cache_dir=work / "cache")
        elif name == "openvino":
            seg.encoder, seg.runtime = openvino_encoder(seg.model.image_encoder, seg.input_size, threads), name
        return time.perf_counter() - t0

    results, reference = {}, None
    for name, batch in (("torch", 1), ("torch, batches of 4", 4), ("onnxruntime (export)", 1),
                        ("onnxruntime (cached model)", 1), ("openvino", 1)):
        setup = build(name)
        seg.embed([s for s, _ in slices[:batch]])  # warm-up
        t0 = time.perf_counter()
        embs = [seg.embed([s for s, _ in slices[b:b + batch]]) for b in range(0, len(slices), batch)]
        per_slice = (time.perf_counter() - t0) / len(slices)
        emb = torch.cat(embs)
        masks = [seg.decode(emb[n], boxes, img.shape).numpy() > 0.5 for n, (img, boxes) in enumerate(slices)]
        row = {"setup_s": round(setup, 2), "s_per_slice": round(per_slice, 4)}
        if reference is None:
            reference = (emb, masks)
        else:
            ref_emb, ref_masks = reference
            inter = sum(int((a & b).sum()) for a, b in zip(masks, ref_masks))
            total = sum(int(a.sum() + b.sum()) for a, b in zip(masks, ref_masks))
            row.update({"max_abs_embedding_diff": float((emb - ref_emb).abs().max()),
                        "embedding_scale": float(ref_emb.abs().max()),
                        "mask_dice_vs_torch": round(2 * inter / max(total, 1), 5)})
        results[name] = row
        print(name, row, flush=True)

    meta = {"case": args.case, "slices": len(slices), "machine": machine(), "torch": torch.__version__}
    try:
        import openvino
        import onnxruntime
        meta.update({"openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__})
    except ImportError:
        pass
    lines = ["| runtime | setup s | s / slice | speed-up | max embedding diff | mask Dice vs torch |", "|---|---|---|---|---|---|"]
    base = results["torch"]["s_per_slice"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['setup_s']} | {r['s_per_slice']:.3f} | {base / r['s_per_slice']:.1f}x | "
                     f"{r.get('max_abs_embedding_diff', 0):.2e} | {r.get('mask_dice_vs_torch', 1.0):.4f} |")
    lines.append(f"\n{len(slices)} slices of {args.case}; {meta['machine']}.")
    write_results(args.out, {"meta": meta, "runtimes": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
