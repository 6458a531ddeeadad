"""What a run says about itself: the opening lines of train.log and the content of results.json."""
from __future__ import annotations

from typing import Any

import torch


def opening_lines(t) -> list[str]:
    """The run, model, data and device; the parameters (LoRA, pretrained weights, token plan); the batch
    geometry and learning rate, of trainer `t`."""
    cfg, tc, env, model = t.cfg, t.cfg.train, t.env, t.model
    backend = torch.distributed.get_backend() if env.launcher != "none" else "none"
    sizes = {k: len(v) for k, v in t.data.splits.items()}
    lines = [f"command: {t.command}"] if t.command else []
    lines.append(f"run {t.run_dir} | model {model.vitlab_name} ({t.params / 1e6:.2f}M params, {t.data.img_size}px, "
                 f"{t.data.in_chans}ch) | data {t.data.info.name}: {sizes['train']} train / {sizes['val']} val / "
                 f"{sizes['test']} test | device {t.device} (threads {torch.get_num_threads()}, amp {tc.amp}, "
                 f"compile {tc.compile})")
    lines.append(f"parameters: {t.params:,} total, {t.trainable:,} trainable ({100 * t.trainable / t.params:.2f}%)"
                 + (f" | LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.targets)}" if cfg.lora.rank else "")
                 + (f" | from {cfg.model.pretrained}" if cfg.model.pretrained else "")
                 + "".join(f"; {n}" for n in getattr(model, "pretrained_notes", []))
                 + (f" | {model.token_plan}" if hasattr(model, "token_plan") else ""))
    lines.append(f"world size {env.world_size} (launcher {env.launcher}, backend {backend}, strategy "
                 f"{tc.strategy if env.launcher != 'none' else 'single'}) | batch {tc.batch_size}/device x "
                 f"{env.world_size} x accum {tc.accum_steps} = {t.global_batch} global | lr {t.lr:.3g}"
                 + (f" (optim.lr {cfg.optim.lr:g}, {cfg.optim.lr_scaling} scaling from "
                    f"{cfg.optim.base_batch_size})" if cfg.optim.lr_scaling != "none" else ""))
    return lines


def results(t, test: dict[str, float], wall: float, train_time: float, train_images: int) -> dict[str, Any]:
    """results.json of trainer `t`: the test metrics, the model and data, and what the run cost."""
    out = {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
           "test_samples": test["n"], "params": t.params, "epochs": t.epoch, "train_seconds": round(wall, 3),
           "images_per_second": train_images / train_time if train_time else None,
           "best_val_loss": t.best_val_loss, "model": t.model.vitlab_name, "dataset": t.data.info.name,
           "device": str(t.device), "weights": "ema" if t.ema is not None else "last", "run_dir": str(t.run_dir)}
    out.update(world_size=t.env.world_size, global_batch=t.global_batch, gflops=t.gflops, **t.memory.read(),
               architecture=t.model.architecture, model_args=t.model.vitlab_args)
    if t.cfg.lora.rank:
        out["trainable_params"] = t.trainable
    if "miou" in test:
        out.update(test_miou=test["miou"], test_dice=test["dice"])
    return out


def test_line(test: dict[str, float], wall: float, run_dir) -> str:
    seg = f" mIoU {test['miou']:.4f} Dice {test['dice']:.4f}" if "miou" in test else ""
    return (f"test top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} loss {test['loss']:.4f}{seg} "
            f"({test['n']} {'pixels' if seg else 'images'}) | {wall:.1f}s | run saved in {run_dir}")
