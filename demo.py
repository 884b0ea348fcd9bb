"""The offline demo (`make demo`): synthetic data -> train tiny BAG-CLIP -> evaluate -> export to a Triton
repository behind the parity gate -> serve it with a real tritonserver -> query it -> heatmaps -> a short
zsad-bench table of the demo model (torch fp32 vs ONNX Runtime on this CPU).

Runs on a CPU-only box without internet in a few minutes. The tiny profile's CLIP has random weights, so the
numbers show that the whole pipeline learns (held-out pixel AUROC rises well above the untrained model's), not
how well BAG-CLIP detects real defects; for that, train the paper profile with real CLIP weights on MVTec AD.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from zsad.cli import cli_entry


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", type=click.Path(), default="demo_out", help="Where everything is written.")
@click.option("--model", default="bagclip", help="Method to train (tiny profile).")
@click.option("--epochs", type=int, default=None, help="Override the tiny profile's epochs.")
@click.option("--no-progress", is_flag=True)
@cli_entry
def main(out, model, epochs, no_progress):
    """Generate the synthetic-defect set, train a tiny model on its training classes, evaluate on held-out ones."""
    run(Path(out), model, epochs, not no_progress)


def run(out: Path, model: str, epochs: int | None, progress: bool) -> dict:
    from zsad.data.synthetic import SYNTHETIC_TEST_CLASSES, SYNTHETIC_TRAIN_CLASSES, generate
    from zsad.evaluate_cli import run as evaluate
    from zsad.export.exporter import ExportOptions, export_model
    from zsad.serve.cli import infer_main
    from zsad.serve.server import TritonServer
    from zsad.train.run import run as train

    t0 = time.perf_counter()
    steps = {}
    click.echo(f"[1/6] synthetic-defect data set -> {out / 'data'}")
    root = generate(out / "data", progress=progress)
    steps["data"] = time.perf_counter() - t0

    ckpt = out / f"{model}-tiny"
    click.echo(f"\n[2/6] training {model} (tiny profile) on {', '.join(SYNTHETIC_TRAIN_CLASSES)}")
    t = time.perf_counter()
    train(model=model, profile="tiny", data=str(root), split="test", classes=",".join(SYNTHETIC_TRAIN_CLASSES),
          clip_weights=None, epochs=epochs, batch_size=None, lr=None, image_size=None, seed=None, out=str(ckpt),
          resume=False, device="cpu", workers=0, progress=progress)
    steps["train"] = time.perf_counter() - t

    click.echo(f"\n[3/6] evaluating on the held-out classes {', '.join(SYNTHETIC_TEST_CLASSES)}")
    t = time.perf_counter()
    report = evaluate(str(ckpt), data=str(root), classes=",".join(SYNTHETIC_TEST_CLASSES), dataset_name="synthetic",
                      out=str(ckpt / "eval"), device="cpu", progress=progress)
    steps["evaluate"] = time.perf_counter() - t

    repo = out / "model_repository"
    click.echo(f"\n[4/6] exporting the checkpoint to a Triton repository (python-ort backend) -> {repo}")
    t = time.perf_counter()
    export_model(ExportOptions(checkpoint=str(ckpt), backend="python-ort", out=repo, max_batch=8,
                               resize_to_input=True),
                 log=lambda msg: click.echo(msg) if not msg.startswith(("stage ", "-", "encoder", "head", "post",
                                                                         "end-to-end")) else None)
    steps["export"] = time.perf_counter() - t

    click.echo("\n[5/6] serving it with tritonserver and scoring held-out images through the ensemble")
    t = time.perf_counter()
    queries = sorted((root / SYNTHETIC_TEST_CLASSES[0] / "test").rglob("*.png"))[::6]
    with TritonServer(repo) as server:
        click.echo(f"  server ready: HTTP {server.http_url}, gRPC {server.grpc_url}")
        infer_main.main([*map(str, queries), "--url", server.http_url, "--model", model, "--threshold", "0.5",
                         "--out", str(out / "served")] + ([] if progress else ["--no-progress"]),
                        standalone_mode=False)
    steps["serve"] = time.perf_counter() - t

    click.echo("\n[6/6] a short benchmark of the trained model (zsad-bench, torch fp32 vs ONNX Runtime, CPU)")
    t = time.perf_counter()
    from zsad.bench.model_bench import bench_model
    from zsad.bench.report import summary_table

    _, _, bench_rows = bench_model(model, "tiny", None, [1, 4], ["torch-fp32", "ort"], "cpu", iters=5, warmup=1,
                                   checkpoint=str(ckpt), served_url=None, concurrency=[1], served_seconds=0,
                                   progress=False, log=click.echo)
    click.echo(summary_table(model, bench_rows))
    steps["bench"] = time.perf_counter() - t

    total = time.perf_counter() - t0
    click.echo("\n" + "=" * 72)
    click.echo(f"demo finished in {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in steps.items()) + ")")
    click.echo(f"  data set     {root}  (preview: {root / 'preview.png'})")
    click.echo(f"  checkpoint   {ckpt / 'checkpoint.safetensors'}  (+ checkpoint.json, history.csv)")
    click.echo(f"  metrics      {ckpt / 'eval' / 'metrics.json'}  and metrics.csv")
    click.echo(f"  heatmaps     {ckpt / 'eval' / 'heatmaps'}/<class>/*.png")
    click.echo(f"  Triton repo  {repo}  (parity report: {repo / model / 'parity_report.json'})")
    click.echo(f"  served       {out / 'served' / 'scores.csv'}  and {out / 'served' / 'heatmaps'}/  "
               f"(start it yourself: zsad-serve {repo})")
    click.echo(f"  held-out pixel AUROC {100 * report['mean']['pixel_auroc']:.1f}, AUPRO "
               f"{100 * report['mean']['pixel_aupro']:.1f} (random-weight tiny CLIP: a pipeline check, not accuracy)")
    return {"seconds": total, "steps": steps, "report": report}


if __name__ == "__main__":
    main()
