"""Draw the MedLSAM icon (128x128 PNG): a CT-like axial slice, a box and its extreme points.

    python scripts/make_icon.py Resources/MedLSAM.png
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Ellipse, Rectangle  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", help="output .png file")
args = parser.parse_args()  # (--help prints this instead of writing a file named "--help")
if not args.out.lower().endswith(".png"):
    parser.error("the output must be a .png file")

fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
ax = fig.add_axes([0, 0, 1, 1])
ax.set_xlim(0, 128)
ax.set_ylim(0, 128)
ax.axis("off")
ax.add_patch(Rectangle((0, 0), 128, 128, color="#1b2631"))
ax.add_patch(Ellipse((64, 64), 112, 96, color="#7f8c8d"))
ax.add_patch(Ellipse((64, 64), 100, 84, color="#566573"))
ax.add_patch(Ellipse((64, 40), 20, 16, color="#ecf0f1"))
ax.add_patch(Ellipse((46, 70), 24, 30, color="#e59866"))
ax.add_patch(Rectangle((32, 53), 28, 34, fill=False, ec="#f1c40f", lw=2.2))
for x, y in ((46, 87), (46, 53), (32, 70), (60, 70)):
    ax.plot(x, y, "o", ms=5, color="#2ecc71", mec="white", mew=0.8)
fig.savefig(args.out, dpi=100)
