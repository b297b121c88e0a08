"""Supervised training loop shared by the zoo and the baselines (with a progress bar)."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 10,
                     lr: float = 3e-3, batch_size: int = 64, weight_decay: float = 0.05,
                     seed: int = 0, progress: bool = True, desc: str = "train") -> nn.Module:
    """AdamW + cosine schedule over ``epochs``; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    # fused: the foreach AdamW step costs more than forward+backward of a small model on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()
