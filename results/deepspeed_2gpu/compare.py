"""Compare the 1-GPU and 2-GPU loss curves (see README.md): writes loss_curves.csv and loss_curves.png."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.metrics import read_metrics_jsonl  # noqa: E402

here = Path(__file__).parent
frames = []
for n in (1, 2):
    m = read_metrics_jsonl(here / f"metrics_{n}gpu.jsonl", run=f"{n} GPU")
    frames.append(m[m.key.isin(["loss/lm", "loss/aux", "conflict/fraction"])])
long = pd.concat(frames)
wide = long.pivot_table(index="step", columns=["key", "run"], values="value")
wide.to_csv(here / "loss_curves.csv")
lm = long[long.key == "loss/lm"].pivot_table(index="step", columns="run", values="value")
diff = (lm["2 GPU"] - lm["1 GPU"]).abs()
first, last = lm.iloc[:5].mean(), lm.iloc[-10:].mean()
summary = (
    f"LM loss, mean of steps 1-5: 1 GPU {first['1 GPU']:.3f}, 2 GPU {first['2 GPU']:.3f}; "
    f"last 10 steps: 1 GPU {last['1 GPU']:.3f}, 2 GPU {last['2 GPU']:.3f}; "
    f"|difference| per step: median {diff.median():.3f}, max {diff.max():.3f}; "
    f"step-to-step s.d. of the 1-GPU curve over the last 20 steps: {lm['1 GPU'].iloc[-20:].diff().std():.3f}"
)
print(summary)
fig, ax = plt.subplots(figsize=(7, 4))
for run in lm.columns:
    ax.plot(lm.index, lm[run], marker=".", label=run)
ax.set_xlabel("optimizer step (global batch 16)")
ax.set_ylabel("language-model loss (nats/token)")
ax.set_title("small_stgc, DeepSpeed ZeRO-2: 1 GPU x 2 accumulation vs 2 GPUs", fontsize=10)
ax.legend()
fig.tight_layout()
fig.savefig(here / "loss_curves.png", dpi=120)
(here / "summary.txt").write_text(summary + "\n")
