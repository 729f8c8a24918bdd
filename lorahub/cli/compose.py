"""The compose command: a new adapter from several, with the error of approximations."""

from __future__ import annotations

import click

from ..compose import METHODS
from .options import (
    HF_CACHE_ENV,
    STORE_ENV,
    device_option,
    env_vars,
    json_option,
    quiet_option,
    reference_argument,
    weights_option,
)
from .output import echo_json, hub_from, parse_weights, table
from .progress import progress_bar


@env_vars(*STORE_ENV, *HF_CACHE_ENV, "HF_HUB_DISABLE_PROGRESS_BARS")
@click.command()
@reference_argument("adapters", nargs=-1, required=True)
@weights_option
@click.option("-m", "--method", type=click.Choice(METHODS), default="cat", show_default=True)
@click.option("--rank", type=int, help="Rank of the result (svd, ties, dare_*, magnitude_prune).")
@click.option("--density", type=float, help="Fraction kept by ties, dare_* and magnitude_prune.")
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="How ties and dare_ties elect each element's sign.",
)
@click.option("--seed", type=int, help="Seed for dare_* (same seed, same result).")
@click.option("-n", "--name", help="Reference for the new adapter (name or name:tag).")
@device_option(default="cpu")
@click.option(
    "--allow-mixed-bases",
    is_flag=True,
    help="Compose adapters recorded for different base models or fan_in_fan_out layouts.",
)
@quiet_option
@json_option
@click.pass_context
def compose(
    ctx: click.Context,
    adapters: tuple[str, ...],
    weights: str | None,
    method: str,
    rank: int | None,
    density: float | None,
    majority_sign: str,
    seed: int | None,
    name: str | None,
    device: str,
    allow_mixed_bases: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Make a new adapter from several, exactly (cat, linear) or approximately.

    Approximate methods print each module's relative error against the exact blend.
    The adapters must be made for one base model (see --allow-mixed-bases). -q prints the
    new adapter's digest reference (@xxh128:...); --json the adapter and the report.

    \b
    Examples:
      lorahub compose sql-expert tone-formal --weights 1.0,0.5 --method cat -n blend:v1
      lorahub compose a b c --method svd --rank 32 -n blend:small
      lorahub compose a b --method ties --density 0.3 --rank 16 -n blend:ties
    """
    with progress_bar("composing", unit="module") as cb:
        result = hub_from(ctx).compose(
            list(adapters),
            parse_weights(weights, len(adapters)),
            method=method,
            rank=rank,
            density=density,
            majority_sign=majority_sign,
            seed=seed,
            name=name,
            device=device,
            allow_mixed_bases=allow_mixed_bases,
            progress=cb,
        )
    if as_json:
        echo_json(result.to_dict())
        return
    if quiet:
        click.echo(f"@{result.adapter.digest}")
        return
    report, info = result.report, result.adapter
    if not report.exact:
        rows = [[e.module, str(e.rank), f"{e.rel_error:.3e}"] for e in report.errors]
        table(rows, ["MODULE", "RANK", "REL. ERROR"])
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    status = "added" if result.added else "present"
    click.echo(f"{status} {info.digest}  {', '.join(info.refs) or '(no name)'}  {report.summary}")


def register(group: click.Group) -> None:
    group.add_command(compose)
