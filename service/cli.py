"""`vlm-steer`: one command-line entry point; each sub-command lives beside the code it drives."""

from __future__ import annotations

import typer

from sae_modules.activations.cli import extract
from sae_modules.evaluation.cli import app as evaluate_app
from sae_modules.evaluation.cli import paper_command, steering_command
from sae_modules.formats.cli import export
from sae_modules.train.cli import train
from service.engine.cli import steer
from service.serve_cli import serve
from service.steering_eval import engine_answerer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.command(help="Extract CLIP-tower activations from images into safetensors shards.")(extract)
app.command(help="Train an SAE on activation shards.")(train)
app.command(help="Write an SAE checkpoint in another library's layout.")(export)
app.command(help="Generate with SAE latents clamped inside the vision tower.")(steer)
app.command(help="Start the HTTP service (Ray Serve).")(serve)
evaluate_app.command("steering")(steering_command(engine_answerer))
evaluate_app.command("paper")(paper_command(engine_answerer))
app.add_typer(evaluate_app, name="evaluate", help="Measure SAEs: reconstruction, monosemanticity, taxonomy, steering.")

if __name__ == "__main__":
    app()
