"""Train a zsad method:  python train/run.py --model bagclip [--profile tiny] [--data PATH] ...

Zero-shot convention (AnomalyCLIP): train on the *test split* of an auxiliary data set that has masks (e.g.
MVTec AD) and evaluate on other data sets. Without --data, the offline synthetic-defect set is generated and its
training classes are used. Writes OUT/checkpoint.safetensors + checkpoint.json after every epoch, plus
train_state.pt (for --resume: the one file that commits an epoch) and history.csv.

Multi-GPU: torchrun --nproc_per_node 4 train/run.py --model bagclip --data /data/mvtec --device cuda
"""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import click

from zsad import ZsadError
from zsad.cli import cli_entry


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZsadError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def training_samples(data: str | None, split: str, classes: str | None, progress: bool,
                     heldout_classes: list[str] | None = None):
    """The samples to train on, the held-out ones (early stopping: ``heldout_classes`` of the same data, split,
    never trained on) and a description of both for the checkpoint sidecar."""
    from zsad.data import data_source, load_samples
    from zsad.data.synthetic import SYNTHETIC_TRAIN_CLASSES

    root, name, class_list = data_source(data, classes, SYNTHETIC_TRAIN_CLASSES, progress=progress)
    held = sorted(set(heldout_classes or []))
    both = sorted(set(held) & set(class_list or []))
    if both:
        raise ZsadError(f"train.heldout_classes {both} are also named in --classes: a held-out class cannot be "
                        f"trained on")
    samples = [s for s in load_samples(root, split=split, classes=class_list) if s.cls not in held]
    if not samples:
        raise ZsadError(f"no training images left in {root} after holding out {held}")
    heldout = load_samples(root, split=split, classes=held) if held else []
    return samples, heldout, {"path": str(root), "dataset": name, "split": split,
                              "classes": sorted({s.cls for s in samples}), "images": len(samples),
                              "anomalous": sum(s.label for s in samples),
                              **({"heldout_classes": held, "heldout_images": len(heldout)} if held else {})}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", "model", required=True, help="Method name: anomalyclip, bagclip, afclip, sowa, bayespfl.")
@click.option("--profile", default="paper", help="Settings profile: 'paper' (published, ViT-L-14-336) or 'tiny' "
              "(small random CLIP for CPU), or a profile .json.")
@click.option("--data", type=click.Path(), default=None, help="Training data root (MVTec AD / MPDD / VisA / BTAD "
              "layout or AnomalyCLIP meta.json, auto-detected). Default: the generated synthetic-defect set.")
@click.option("--split", default="test", type=click.Choice(["train", "test"]),
              help="Split to train on; zero-shot training uses the auxiliary set's test split (it has masks).")
@click.option("--classes", default=None, help="Comma-separated classes to train on (default: all; synthetic: its "
              "training classes).")
@click.option("--clip-weights", type=click.Path(), default=None,
              help="Local CLIP weights (.safetensors or .pt) instead of the profile's pretrained tag (offline use).")
@click.option("--epochs", type=int, default=None, help="Override the profile's epochs.")
@click.option("--batch-size", type=int, default=None, help="Override the profile's batch size (per process).")
@click.option("--lr", type=float, default=None, help="Override the profile's learning rate.")
@click.option("--image-size", type=int, default=None, help="Override the profile's input size (pixels).")
@click.option("--seed", type=int, default=None, help="Override the profile's seed (data order).")
@click.option("--out", type=click.Path(), default=None,
              help="Output directory [default: runs/<model>-<profile>-<time>].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:1 or auto.")
@click.option("--workers", type=int, default=0, help="DataLoader worker processes.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@cli_entry
def main(model, profile, data, split, classes, clip_weights, epochs, batch_size, lr, image_size, seed, out, resume,
         device, workers, no_progress):
    """Train a zero-shot anomaly detection method and write a checkpoint."""
    run(model, profile, data, split, classes, clip_weights, epochs, batch_size, lr, image_size, seed, out,
        resume, device, workers, not no_progress)


def run(model, profile, data, split, classes, clip_weights, epochs, batch_size, lr, image_size, seed, out, resume,
        device, workers, progress):
    import zsad.methods as M
    from zsad.checkpoint import clip_override
    from zsad.configs import build_config, deep_merge
    from zsad.data import AnomalyDataset
    from zsad.train.loop import init_distributed, load_train_state, train

    device = resolve_device(device)
    dinfo = init_distributed(device)
    if device == "cuda" and dinfo.world_size > 1:
        device = f"cuda:{dinfo.local_rank}"
    if resume and not out:
        raise ZsadError("--resume needs --out (the run directory to continue)")
    out_dir = Path(out or f"runs/{model}-{Path(profile).stem}-{datetime.now():%Y%m%d-%H%M%S}")

    overrides = {"train": {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr),
                                             ("seed", seed)) if v is not None}}
    if image_size:
        overrides["backbone"] = {"image_size": image_size}
    overrides = deep_merge(overrides, clip_override(clip_weights))
    if resume:
        # continue with the run's own settings and data; only the epoch count may grow (and the CLIP file move)
        changed = [n for n, v in (("--batch-size", batch_size), ("--lr", lr), ("--image-size", image_size),
                                  ("--seed", seed), ("--data", data), ("--classes", classes)) if v is not None]
        if changed:
            raise ZsadError(f"--resume continues the run as it was started; {', '.join(changed)} cannot change")
        meta = load_train_state(out_dir)["sidecar"]  # the committed state, not files a crash may have left stale
        if meta.get("method") != model:
            raise ZsadError(f"--resume: {out_dir} holds a '{meta['method']}' run, not '{model}'")
        cfg_dict = deep_merge(meta["config"], {k: v for k, v in overrides.items() if k == "backbone"})
        if epochs:
            cfg_dict = deep_merge(cfg_dict, {"train": {"epochs": epochs}})
        cfg = build_config(M.METHODS[model].config_class, cfg_dict, where=str(out_dir))
        profile = meta["profile"]
        data_meta = meta.get("data", {})
        data, split = data_meta.get("path"), data_meta.get("split", split)
        classes = ",".join(data_meta.get("classes", []))
    else:
        cfg = M.resolve_config(model, profile, **overrides)
    # the data before the model: a wrong --data is said before CLIP loads (a first ViT-L load downloads 1.7 GB)
    samples, heldout, data_meta = training_samples(data, split, classes, progress and dinfo.main,
                                                   cfg.train.heldout_classes)
    method = M.build(model, cfg, profile)
    dataset = method.training_dataset(AnomalyDataset(samples, cfg.backbone.image_size), data_meta)
    if dinfo.main:
        n_train = sum(p.numel() for p in method.trainable_parameters().values())
        click.echo(f"training {model} ({method.profile}) on {data_meta['dataset'] or data_meta['path']} "
                   f"[{', '.join(data_meta['classes'])}]: {len(samples)} images, {cfg.train.epochs} epochs, "
                   f"batch {cfg.train.batch_size} x {dinfo.world_size} process(es), lr {cfg.train.lr}, "
                   f"stages {[st.epochs for st in method.training_stages()]} epochs (at most), "
                   f"held-out {len(heldout)} images, "
                   f"{n_train:,} trainable parameters, device {device}, CLIP weights: {method.backbone.info.weights}")
    t0 = time.perf_counter()
    result = train(method, dataset, out_dir, resume=resume, device=device, workers=workers, progress=progress,
                   meta={"data": data_meta, "world_size": dinfo.world_size}, dinfo=dinfo, heldout=heldout)
    if dinfo.main:
        last = result["history"][-1]
        click.echo(f"done in {time.perf_counter() - t0:.1f} s: final loss {last['total']:.4f}; checkpoint: "
                   f"{out_dir / 'checkpoint.safetensors'} (+ checkpoint.json, history.csv)")
    return result


if __name__ == "__main__":
    main()
