"""``dynalay demo``: a small FPI-layer classifier on scikit-learn's bundled digits."""
from __future__ import annotations

import time


def run_demo(args) -> int:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from .nn import FPILayer

    torch.manual_seed(args.seed)
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = [torch.tensor((a - mu) / sd, dtype=torch.float32) for a in (Xtr, Xte)]
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    layer = FPILayer(64, 128, tol=1e-4, max_iter=50, check="none")
    head = torch.nn.Linear(128, 10)
    opt = torch.optim.Adam(list(layer.parameters()) + list(head.parameters()), lr=1e-3)
    t0 = time.time()
    for ep in range(args.epochs):
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(head(layer(Xtr[idx])), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    layer.eval()
    with torch.no_grad():
        acc = (head(layer(Xte)).argmax(1) == yte).float().mean().item()
    st = layer.last_stats
    print(f"digits: test accuracy {acc * 100:.1f}%  train {time.time() - t0:.1f}s  "
          f"iterations/sample mean {st.iters.float().mean():.1f} (min {int(st.iters.min())}, max {int(st.iters.max())})"
          f"  converged {int(st.converged.sum())}/{len(st.converged)}")
    return 0 if np.isfinite(acc) else 1
