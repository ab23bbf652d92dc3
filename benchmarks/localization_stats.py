"""Presence misses and confidence-vs-IoU correlation of one arm of a localization benchmark JSON.

    python benchmarks/localization_stats.py docs/bench/localization.json hybrid
"""
import json
import sys

import numpy as np

doc = json.loads(open(sys.argv[1] if len(sys.argv) > 1 else "docs/bench/localization.json").read())
arm = sys.argv[2] if len(sys.argv) > 2 else "hybrid"
rows = [(c["case"], name, v) for c in doc["cases"] if arm in c for name, v in c[arm].items() if v.get("gt_present")]
missed = [(case, name) for case, name, v in rows if not v["pred_present"]]
conf = np.array([v["confidence"] for _, _, v in rows])
iou = np.array([v["iou"] for _, _, v in rows])
print(f"{arm}: structures in the scans: {len(rows)}; reported absent: {len(missed)} {missed}")
print(f"confidence range {conf.min():.2f}-{conf.max():.2f}; Pearson r(confidence, IoU) = {np.corrcoef(conf, iou)[0, 1]:.2f}")
