"""zsad-export: a trained method -> per-stage ONNX (or TensorRT plans) -> a Triton model repository.

    zsad-export --checkpoint runs/bagclip --backend onnxruntime --out model_repository
    zsad-export --model bagclip --profile tiny --backend python-ort --out model_repository   # untrained
    zsad-export --checkpoint runs/afclip --support good_bottles/ --shots 4 --name afclip_bottle   # few-shot

Every stage passes the parity gate (ONNX Runtime vs PyTorch on random and synthetic-defect inputs, batch 1 and
> 1, and the chain end to end) before anything is written; the report lands in OUT/NAME/parity_report.json.
"""
from __future__ import annotations

import click

from zsad import ZsadError
from zsad.cli import cli_entry
from zsad.cpu import preference_text
from zsad.export import runtimes
from zsad.export.openvino_export import PRECISIONS as OV_PRECISIONS
from zsad.export.triton_repo import OV_PERFORMANCE_HINTS


class BackendChoice(click.Choice):
    """--backend: the registered runtimes (zsad.export.runtimes) that ``where`` accepts, read when the option is
    parsed or shown, so a runtime registered after this module was imported is offered too."""

    def __init__(self, where=lambda runtime: True):
        self.where = where
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self):
        return tuple(rt.name for rt in runtimes.RUNTIMES.values() if self.where(rt))

    @choices.setter
    def choices(self, _):
        pass  # click.Choice's own __init__ sets them; the registry is the list


def _batches(value: str | None) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()] if value else []
    except ValueError:
        raise ZsadError(f"--preferred-batch-size takes comma-separated integers such as 8,16, got '{value}'") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default=None, help="Method (anomalyclip, bagclip, ...). Taken from --checkpoint if given.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Checkpoint directory from train/run.py. Without it the UNTRAINED method is exported (loud "
                   "warning): fine for architecture benchmarks only.")
@click.option("--profile", default="paper", help="Profile for an untrained export: paper or tiny.")
@click.option("--image-size", type=int, default=None, help="Model input size (positional embeddings are baked).")
@click.option("--clip-weights", type=click.Path(), default=None, help="Local CLIP weights file (offline).")
@click.option("--backend", default="onnxruntime", type=BackendChoice(),
              help="; ".join(f"{rt.name}: {rt.summary}" for rt in runtimes.RUNTIMES.values()) + ".")
@click.option("--precision", type=click.Choice([*OV_PRECISIONS, "auto"]), default="fp32",
              help="OpenVINO backends: fp32; bf16 (OpenVINO's inference-precision hint); int8 (NNCF post-training "
                   "quantisation of the encoder's linear layers and attention, LayerNorm / softmax / final "
                   "projection kept fp32); int8-bf16 (int8 linear layers, attention and the rest in bf16: the "
                   "fastest on AMX); int8-qk-bf16 (int8 linear layers and attention's Q.K^T, its P.V and the rest "
                   "in bf16: the fastest on the AMD EPYC measured); auto (read this CPU's instruction sets from "
                   f"/proc/cpuinfo and try, fastest first, {preference_text()}, keeping the first that passes its "
                   "gate; where a bf16 linear layer, timed here first (~20 ms), is no faster than fp32, int8 goes "
                   "first and bf16 out, as on Intel AVX-512 BF16 without AMX: the choice, the timing and why are "
                   "in parity_report.json, precision_choice). Every precision but fp32 "
                   "must pass the precision gate against fp32 on the synthetic set, else nothing is written.")
@click.option("--ov-hint", type=click.Choice(OV_PERFORMANCE_HINTS), default="latency",
              help="OpenVINO backends: the CPU plugin's performance hint in the served configs. latency: one stream "
                   "on every core (the fastest single request); throughput: several streams (as many as OpenVINO "
                   "finds best for this CPU), and the python-openvino stages run the images of a dynamic batch on "
                   "them at once, each image slower: for machines with cores to spare per stream (on a 2-core box "
                   "latency served twice the images per second at every load measured).")
@click.option("--calibration", type=click.Path(), default=None,
              help="int8 precisions: a folder of images (searched recursively) to calibrate on [default: the "
                   "synthetic set]. Use your own product's images: the gate then runs on your weights and data.")
@click.option("--calibration-images", type=int, default=32,
              help="int8 precisions: how many calibration images to use.")
@click.option("--portable-int8", is_flag=True,
              help="int8 precisions: quantise the weights in 7 bits, so the model computes exactly on every x86 "
                   "CPU. Without it, 8 bits where this CPU has VNNI or AMX, and a CPU without VNNI (AVX2 only, or "
                   "AVX-512 before Cascade Lake), whose int8 dot products overflow with 8-bit weights, refuses to "
                   "serve the model; 7 bits where this CPU has no VNNI.")
@click.option("--gate-images", type=int, default=16,
              help="Every precision but fp32: synthetic images the precision gate uses.")
@click.option("--fp16", is_flag=True, help="fp16 compute (TensorRT flag; fp16 ONNX for ORT-CUDA; autocast for "
              "python-torch). Refused where this machine cannot run and check fp16.")
@click.option("--max-batch", type=int, default=32, help="Largest batch (dynamic batch axis 1..max).")
@click.option("--preferred-batch-size", "--preferred-batch", "preferred_batch", default=None,
              help="Dynamic batcher's preferred sizes, e.g. 8,16 [default: none, as Triton's batcher guide advises: "
                   "set them only where a model runs those sizes measurably faster].")
@click.option("--queue-delay-us", type=int, default=None, help="Dynamic batcher's max queue delay (microseconds): how "
              "long a request may wait for others to batch with [default: 200].")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True,
              help="Triton's dynamic batcher on every stage model. Off, each request runs alone: on a small CPU "
                   "server that serves more (a 2-core AMX Xeon, python-openvino bf16, latency hint: 0.85 "
                   "images/s at 8 requests in flight without it, 0.52 with it; bench/results/2026-12-06-cpu-curves).")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default=None,
              help="Instance kind in the configs [default: cpu for "
                   + ", ".join(rt.name for rt in runtimes.RUNTIMES.values() if rt.default_device == "cpu")
                   + "; gpu otherwise].")
@click.option("--instances", type=int, default=1, help="Model instances per stage.")
@click.option("--resize-to-input", is_flag=True, help="Add an anomaly_map_original output at the input image size.")
@click.option("--out", type=click.Path(), default="model_repository", help="Triton model repository (created). "
              "Model folders of an earlier export (they hold .zsad-export.json) are replaced; others are never "
              "touched: a name clash with them is refused unless --force.")
@click.option("--name", default=None, help="Model name in the repository [default: the method name]: letters, "
              "digits, '_' and '-'.")
@click.option("--force", is_flag=True, help="Replace folders under --out named like the exported models even if "
              "zsad-export did not write them.")
@click.option("--parity-images", type=int, default=4, help="Synthetic-defect images for the parity gate (its "
              "batch > 1 case uses all of them).")
@click.option("--max-pixels", type=int, default=50_000_000, help="Decoded images above this many pixels are "
              "refused by the server's preprocess model.")
@click.option("--support", type=click.Path(), default=None, help="Few-shot (methods with a few-shot mode; "
              "the others are refused with the list): a folder of normal images of one product, or a data-set root "
              "with --support-class; the memory bank is baked in.")
@click.option("--version", "version", type=int, default=None, help="Add the export as version N of the export of "
              "the same --name already in --out (numbered version folders; refused if N exists or the models or "
              "their configs differ). Nothing served changes: zsad-deploy switches a running zsad-serve to it.")
@click.option("--shots", type=int, default=0, help="Few-shot: K normal images drawn (seeded) from --support.")
@click.option("--support-class", default=None, help="Few-shot: the class of a data-set root given as --support.")
@cli_entry
def main(model, checkpoint, profile, image_size, clip_weights, backend, fp16, max_batch, preferred_batch,
         queue_delay_us, dynamic_batching, device, instances, resize_to_input, out, name, force, parity_images,
         max_pixels, support, shots, support_class, precision, ov_hint, calibration, calibration_images, gate_images,
         version, portable_int8):
    """Export a zsad method to a Triton model repository, stage by stage, behind a parity gate."""
    from zsad.export.exporter import ExportOptions, export_model

    if not dynamic_batching and (preferred_batch or queue_delay_us is not None):
        raise ZsadError("--preferred-batch-size and --queue-delay-us set the dynamic batcher, which "
                        "--no-dynamic-batching turns off: give one or the other")
    export_model(ExportOptions(
        model=model, checkpoint=checkpoint, profile=profile, image_size=image_size, clip_weights=clip_weights,
        out=out, name=name, force=force,
        backend=backend, device=device, max_batch=max_batch, preferred_batch=_batches(preferred_batch),
        queue_delay_us=ExportOptions.queue_delay_us if queue_delay_us is None else queue_delay_us,
        dynamic_batching=dynamic_batching,
        instances=instances, resize_to_input=resize_to_input, max_pixels=max_pixels,
        support=support, shots=shots, support_class=support_class,
        fp16=fp16, precision=precision, calibration=calibration, calibration_images=calibration_images,
        portable_int8=portable_int8, gate_images=gate_images, parity_images=parity_images, version=version,
        ov_hint=ov_hint), log=click.echo)

if __name__ == "__main__":
    main()
