"""``fedctl export``: write a model of a state dir as a file PyTorch, safetensors, numpy or MXNet Gluon loads."""

from __future__ import annotations

from pathlib import Path

import click

from fedctl.api.files import export_model
from fedctl.exporting import FORMATS


@click.command("export")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/default"),
              show_default=True, help="The state dir of a run (`fedctl serve` or `fedctl simulate`).")
@click.option("--round", "round_no", type=click.IntRange(min=0), default=None,
              help="Export the model after this round (ssp/async: model version), if the run kept it "
                   "(`serve --keep-models`) [default: the last checkpoint's].")
@click.option("--best", is_flag=True, default=False,
              help="Export the best model by the run's --best-metric (model-best.npz).")
@click.option("--format", "fmt", type=click.Choice(sorted(FORMATS)), default=None,
              help="pt: torch.save state dict; safetensors; npz; params: MXNet Gluon load_parameters "
                   "[default: from the --out suffix, else pt].")
@click.option("--out", type=click.Path(), default=None,
              help="The file to write (a directory: the default name in it) [default: MODEL-roundN.FORMAT here].")
@click.option("--task", "task_ref", default=None, metavar="FILE.py|MODULE|NAME",
              help="The run's task: checked against the state dir; with --format pt, the tensors the federation "
                   "does not average (local buffers, num_batches_tracked) come from a fresh model(), so a strict "
                   "load_state_dict takes the file.")
def export_cmd(state_dir: Path, round_no: int | None, best: bool, fmt: str | None, out: str | None,
               task_ref: str | None) -> None:
    """Write a model of a run's --state-dir as a file a framework loads as it is: the tensors keyed by the model's
    parameter names, each in its model dtype.

    \b
      pt            model.load_state_dict(torch.load("mlp-round20.pt"))
      safetensors   model.load_state_dict(safetensors.torch.load_file(...))
      npz           numpy.load(...)
      params        net.load_parameters(...)   (MXNet Gluon)
    """
    done = export_model(state_dir, format=fmt, out=out, round=round_no, best=best, task=task_ref)
    which = f"best model ({done.best['metric']} {done.best['value']:.6g})" if done.best else "model"
    click.echo(f"exported the {which} of round {done.round} of {done.model} ({done.tensors} tensors, "
               f"{done.parameters:,} parameters, {'/'.join(done.dtypes)}) to {done.path}; load it with "
               f"{done.loads_with.replace('FILE', repr(str(done.path)))}")
