"""``zsad-import``: a released checkpoint -> a zsad checkpoint directory (then ``zsad-export`` / ``zsad-eval``)."""
from __future__ import annotations

import json

import click

from zsad.cli import cli_entry


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--from", "fmt", required=True, type=click.Choice(["anomalyclip", "afclip", "bayespfl", "sowa"]),
              help="The released format: anomalyclip (epoch_N.pth), afclip (<data>_prompt.pt + <data>_adaptor.pt), "
                   "bayespfl (train_<data>.pth), sowa (Lightning .ckpt).")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--clip-weights", type=click.Path(dir_okay=False), default=None,
              help="Local CLIP weights (OpenAI ViT-L/14@336: .pt or .safetensors) to record instead of the "
                   "'openai' tag (which downloads once).")
@click.option("--profile", default="paper", show_default=True, help="zsad profile the weights fit (paper = the "
              "published ViT-L/14@336 setting).")
@cli_entry
def main(fmt, files, out, clip_weights, profile):
    from zsad.importers import import_checkpoint

    path = import_checkpoint(fmt, files, out, clip_weights=clip_weights, profile=profile)
    meta = json.loads((path / "checkpoint.json").read_text())["imported"]
    click.echo(f"imported {fmt} ({', '.join(f['path'] for f in meta['files'])}): {meta['values_imported']:,} values "
               f"in {len(meta['mapping'])} tensors, {len(meta['dropped'])} dropped entries -> {path}")
    click.echo(f"backbone: {meta['backbone']}")
    click.echo(f"next: zsad-export --checkpoint {path} --out model_repository")
