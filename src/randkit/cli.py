"""The ``randkit`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import randkit
from randkit.errors import RunFailure, UserError, storage_error, storage_message
from randkit.extras import require
from randkit.memory import keep_freed_memory

app = typer.Typer(
    name="randkit",
    help="Randomness as a controlled resource: training, cross-validation, deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_out = Console(highlight=False)


@app.callback()
def _every_command() -> None:
    """Randomness as a controlled resource: training, cross-validation, deployment."""
    keep_freed_memory()  # large tensors otherwise page-fault on every allocation


@app.command()
def version() -> None:
    """Print the versions of randkit and PyTorch."""
    import torch

    _out.print(f"randkit {randkit.__version__} (torch {torch.__version__})")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    out: Annotated[Path | None, typer.Option(help="Run directory [default: runs/<config>]")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the root seed.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    restart: Annotated[bool, typer.Option(help="Discard a checkpoint in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar, no summary.")] = False,
) -> None:
    """Train a model; the same command with the same --out resumes after a crash."""
    from randkit.config import load_config
    from randkit.train import train_run

    overrides: dict[str, object] = {}
    if seed is not None:
        overrides["seed"] = seed
    if epochs is not None:
        overrides["train.epochs"] = epochs
    cfg = load_config(config, overrides)
    out = out or Path("runs") / config.stem
    result = train_run(cfg, out, restart=restart, quiet=quiet)
    if not quiet:
        test = result.metrics["test"]
        if result.resumed_from_step is not None:
            _out.print(f"resumed from step {result.resumed_from_step}")
        _out.print(
            f"test accuracy {test['accuracy']:.4f}  loss {test['loss']:.4f}  "
            f"macro-F1 {test['macro_f1']:.4f}  ->  {out}"
        )


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="A finished run directory.")],
    noise: Annotated[
        list[str] | None,
        typer.Option(
            help="KIND:L1,L2,... e.g. gaussian:0,0.1,0.3 (repeatable).", show_default=False
        ),
    ] = None,
    mc: Annotated[
        list[str] | None,
        typer.Option(
            help="dropout:32, tta:16 or weight_noise:32 (repeatable).", show_default=False
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Request seed of the Monte-Carlo samples.")] = 0,
    quiet: Annotated[bool, typer.Option(help="Print nothing.")] = False,
) -> None:
    """Robustness under test noise (--noise) and Monte-Carlo uncertainty (--mc)."""
    from randkit.deploy.mc_evaluate import evaluate_mc, parse_mc
    from randkit.randomize.noise import parse_noise_levels
    from randkit.robustness import robustness_curves, write_robustness
    from randkit.train.load import load_trained

    if not noise and not mc:
        raise UserError("noise", "give --noise KIND:L1,L2,... and/or --mc KIND:SAMPLES")
    require("report", "randkit evaluate")  # draws its curves with matplotlib
    if seed < 0:
        raise UserError("--seed", f"must be >= 0, got {seed}")
    sweeps: dict[str, list[float]] = {}
    for spec in noise or []:
        try:
            kind, levels = parse_noise_levels(spec)
        except ValueError as exc:
            raise UserError("noise", str(exc)) from None
        sweeps[kind] = levels
    for spec in mc or []:
        parse_mc(spec)  # refuse a bad spec before any work
    if (run / "plan.json").is_file():  # a cross-validation: only its fold-model ensemble
        if sweeps or [s for s in mc or [] if parse_mc(s)[0] != "ensemble"]:
            raise UserError("run", "a cross-validation run supports only --mc ensemble")
        from randkit.deploy.mc_evaluate import evaluate_cv_ensemble

        r = evaluate_cv_ensemble(run)["ensemble"]
        if not quiet:
            _out.print(
                f"ensemble of {r['members']} fold models on {r['holdout_size']} held-out "
                f"examples: accuracy {r['accuracy']:.4f}  nll {r['nll']:.4f}  "
                f"ece {r['ece']:.4f}"
            )
        return
    trained = load_trained(run)
    if trained.prepared.kind == "text" and sweeps:
        raise UserError("noise", "input noise needs image or vector data, got text")
    if sweeps:
        curves = robustness_curves(
            trained.model,
            trained.prepared.test,
            len(trained.prepared.classes),
            sweeps,
            trained.streams,
            trained.device,
            clip=trained.prepared.unit_range,
        )
        json_path, png_path = write_robustness(
            run, curves, {"test_size": len(trained.prepared.test)}
        )
        if not quiet:
            for kind, points in curves.items():
                for point in points:
                    _out.print(
                        f"{kind:12s} level {point['level']:<6g} accuracy "
                        f"{point['accuracy']:.4f}  loss {point['loss']:.4f}"
                    )
            _out.print(f"-> {json_path}, {png_path}")
    if mc:
        reports = evaluate_mc(trained, list(mc), seed)
        if not quiet:
            for spec in mc:
                kind = spec.partition(":")[0]
                r = reports[kind]
                _out.print(
                    f"mc {kind:12s} accuracy {r['accuracy']:.4f}  nll {r['nll']:.4f}  "
                    f"brier {r['brier']:.4f}  ece {r['ece']:.4f}  aurc {r['aurc']:.4f}"
                )
            _out.print(f"-> {run / 'uncertainty.json'}")


@app.command()
def cv(
    config: Annotated[Path, typer.Argument(help="Experiment YAML file.")],
    out: Annotated[
        Path | None, typer.Option(help="Run directory [default: runs/<config>-cv]")
    ] = None,
    runner: Annotated[
        str | None, typer.Option(help="sequential | vectorized | processes | ray")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (processes runner).")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (ray runner).")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the root seed.")] = None,
    restart: Annotated[bool, typer.Option(help="Discard finished trials in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar, no summary.")] = False,
) -> None:
    """Cross-validate; the same command with the same --out finishes only missing trials."""
    from randkit.config import load_config
    from randkit.cv import run_cv

    overrides: dict[str, object] = {}
    for key, value in (
        ("cv.runner", runner),
        ("cv.workers", workers),
        ("cv.address", address),
        ("seed", seed),
    ):
        if value is not None:
            overrides[key] = value
    cfg = load_config(config, overrides)
    out = out or Path("runs") / f"{config.stem}-cv"
    result = run_cv(cfg, out, restart=restart, quiet=quiet)
    if not quiet:
        _print_summary(result.summary, result.report)


def _print_summary(summary: dict, report: Path | None) -> None:
    from rich.table import Table

    from randkit.cv.intervals import read_headline

    table = Table(
        title=f"cross-validation: {summary['n_trials']} trials "
        f"({summary['folds']} folds x {summary['repeats']} repeats)"
    )
    for column in ("metric", "mean", "std", "95% CI", "interval"):
        table.add_column(column)
    notes = []
    for name, values in summary["per_metric"].items():
        head = read_headline(summary if name == summary["metric"] else values)
        ci, method = head["ci"], head["method"]
        if ci is None and head["note"]:
            notes.append(f"{name}: {head['note']}")
        table.add_row(
            name,
            f"{values['mean']:.4f}",
            f"{values['std']:.4f}",
            f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "none",
            _METHOD_NAMES.get(method, "see below" if ci is None else str(method)),
        )
    _out.print(table)
    for note in notes:
        _out.print(note)
    naive = read_headline(summary)["naive"]
    if naive:
        _out.print(
            f"naive t interval of {summary['metric']} (ci95_naive): [{naive[0]:.4f}, "
            f"{naive[1]:.4f}]; too narrow when trials share training data (repeated k-fold)"
        )
    nested = summary.get("nested")
    if nested:  # cost and MSE estimate of the nested interval (randkit.cv.nested)
        _out.print(f"{summary['ci95_note']}; MSE estimate of the CV error {nested['mse']:.3g}")
    components = summary.get("variance_components", {}).get("components", {})
    for name, part in components.items():
        _out.print(f"variance from {name}: {part['variance']:.3g} ({100 * part['share']:.0f}%)")
    if report is not None:
        _out.print(f"report: {report}", soft_wrap=True)  # a path must stay whole to be copied


_METHOD_NAMES = {
    "nadeau_bengio_logit": "corrected, logit scale",
    "nadeau_bengio": "corrected",
    "clopper_pearson": "exact, one split",
    "nested": "nested CV (Bates et al.)",
}


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="First cross-validation run.")],
    run_b: Annotated[Path, typer.Argument(help="Second run, same cv plan.")],
    metric: Annotated[str | None, typer.Option(help="Metric [default: the runs' metric]")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the result.")] = None,
    rope: Annotated[
        float | None,
        typer.Option(
            help="Half-width of the region of practical equivalence of the Bayesian test "
            "[default: 0.01 on a [0, 1] metric, else 1% of the mean score]"
        ),
    ] = None,
) -> None:
    """Paired comparison of two runs with tests valid for cross-validation."""
    from randkit import atomic
    from randkit.cv.compare import compare_runs

    if json_out is not None and json_out.is_dir():
        raise UserError("--json", f"{str(json_out)!r} is a directory; give a file name")
    result = compare_runs(run_a, run_b, metric, rope=rope)
    test = result["corrected_t_test"]
    _out.print(
        f"{result['metric']}: {run_a.name} {result['mean_a']:.4f}  vs  "
        f"{run_b.name} {result['mean_b']:.4f}  over {result['n_trials']} paired trials"
    )
    _out.print(
        f"Nadeau-Bengio corrected t-test: t = {test['t']:.3f}, df = {test['df']}, "
        f"p = {test['p_value']:.4g}, 95% CI of the difference "
        f"[{test['ci'][0]:.4f}, {test['ci'][1]:.4f}]"
    )
    if "five_by_two_t_test" in result:
        five = result["five_by_two_t_test"]
        _out.print(f"Dietterich 5x2cv t-test: t = {five['t']:.3f}, p = {five['p_value']:.4g}")
    _out.print(result["verdict"])
    bayes = result["bayesian_correlated_t_test"]
    _out.print(
        f"Bayesian correlated t-test (ROPE +-{bayes['rope']:.4g}, {bayes['rope_chosen']}): "
        f"P({run_a.name} better) = {bayes['p_a_better']:.3f}, P(equivalent) = "
        f"{bayes['p_equivalent']:.3f}, P({run_b.name} better) = {bayes['p_b_better']:.3f}"
    )
    _out.print(result["bayesian_verdict"])
    if json_out is not None:
        atomic.write_json(json_out, result)


@app.command()
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="RUN (cross-validation or train), or RUN_A RUN_B.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Comparison page [default: RUN_A/compare-RUN_B.html]")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="Metric compared [default: A's]")] = None,
    rope: Annotated[
        float | None, typer.Option(help="ROPE half-width of the Bayesian test (see compare).")
    ] = None,
) -> None:
    """Write RUN/report.html, or with two cross-validation runs a page comparing them."""
    require("report", "randkit report")
    from randkit.report import write_comparison, write_report

    if len(runs) > 2:
        raise UserError("runs", f"give one run or two to compare, got {len(runs)}")
    if len(runs) == 1:
        if out is not None or metric is not None or rope is not None:
            raise UserError("--out", "--out, --metric and --rope compare two runs; give RUN_B")
        _out.print(f"report: {write_report(runs[0])}", soft_wrap=True)
        return
    page = write_comparison(runs[0], runs[1], out, metric=metric, rope=rope)
    _out.print(f"comparison: {page}")


@app.command()
def certify(
    run: Annotated[Path, typer.Argument(help="A finished training run.")],
    sigma: Annotated[float, typer.Option(help="Noise level of the smoothed classifier.")],
    n0: Annotated[int, typer.Option(help="Samples that pick the class.")] = 100,
    n: Annotated[
        int, typer.Option(help="Samples that certify (the maximum with --radius).")
    ] = 100_000,
    alpha: Annotated[float, typer.Option(help="Failure probability.")] = 0.001,
    batch: Annotated[int, typer.Option(help="Noise samples per forward pass.")] = 1000,
    skip: Annotated[int, typer.Option(help="Certify every K-th test input.")] = 1,
    max_inputs: Annotated[int | None, typer.Option("--max", help="At most K inputs.")] = None,
    radius: Annotated[
        float | None,
        typer.Option(help="Decide certification at this radius, sequentially (adds 'samples')."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="TSV file [default: in RUN]")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar, no summary.")] = False,
    onnx: Annotated[
        Path | None, typer.Option(help="Certify this model.onnx (onnxruntime) on RUN's inputs.")
    ] = None,
) -> None:
    """Certified L2 robustness by randomized smoothing (Cohen et al. 2019), TSV + curve."""
    from randkit.deploy.certify_run import certify_run

    require("report", "randkit certify")  # draws the certified-accuracy curve with matplotlib
    result = certify_run(
        run, sigma, n0, n, alpha, batch, skip, max_inputs, radius, out, quiet, onnx=onnx
    )
    if not quiet:
        pairs = zip(result["radii"], result["certified_accuracy"], strict=True)
        _out.print("  ".join(f"r={r:g}: {a:.3f}" for r, a in pairs))
        _out.print(f"-> {result['tsv']}, {result['curve']}")


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(help="A finished training run.")],
    samples: Annotated[int, typer.Option(help="Noisy copies per input.")] = 50,
    sigma: Annotated[float, typer.Option(help="Noise std (input units).")] = 0.15,
    index: Annotated[list[int] | None, typer.Option(help="Test input (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Request seed (stream deploy).")] = 0,
    out: Annotated[Path | None, typer.Option(help="PNG [default: RUN/smoothgrad.png]")] = None,
) -> None:
    """SmoothGrad saliency maps of test inputs beside the inputs and their predictions."""
    from randkit.deploy.explain import explain_run

    require("report", "randkit explain")  # draws the saliency maps with matplotlib
    result = explain_run(run, samples, sigma, list(index or []), seed, out)
    _out.print(f"-> {result['png']}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A finished training or cross-validation run.")],
    repository: Annotated[Path, typer.Option(help="Model repository directory.")],
    name: Annotated[str, typer.Option(help="Model name in the repository.")],
    version: Annotated[str | None, typer.Option(help="Version [default: next integer]")] = None,
    ensemble: Annotated[
        bool, typer.Option(help="Export a cross-validation's fold models.")
    ] = False,
    fmt: Annotated[
        str, typer.Option("--format", help="bundle, or onnx: the bundle plus a checked model.onnx.")
    ] = "bundle",
) -> None:
    """Write a model bundle REPOSITORY/NAME/VERSION/ (safetensors + bundle.json)."""
    from randkit.deploy.bundle import export_bundle

    if fmt not in ("bundle", "onnx"):
        raise UserError("--format", f"must be bundle or onnx, got {fmt!r}")
    if fmt == "onnx":
        from randkit.deploy.onnx_export import export_onnx

        _out.print(f"-> {export_onnx(run, repository, name, version, ensemble)}")
        return
    _out.print(f"-> {export_bundle(run, repository, name, version, ensemble)}")


@app.command()
def serve(
    repository: Annotated[Path, typer.Argument(help="Model repository: NAME/VERSION/ bundles.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback unless told).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    grpc_port: Annotated[
        int | None, typer.Option(help="Also serve KServe V2 gRPC on this port (none: off).")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer TOKEN' (or RANDKIT_TOKEN).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Rows per forward batch.")] = 64,
    max_delay_ms: Annotated[float, typer.Option(help="Longest wait to fill a batch.")] = 2.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body.")] = 16.0,
    body_timeout_s: Annotated[
        float, typer.Option(help="Drop a request whose body stops short for this long.")
    ] = 30.0,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads for inference [default: torch's]")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Server processes sharing the port(s), each with the models.")
    ] = 1,
    seed: Annotated[int, typer.Option(help="Root seed of streams deploy and traffic.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    ledger: Annotated[
        str | None,
        typer.Option(
            help="Experiment ledger: a SQLite file or postgresql://USER@HOST/DB (or "
            "RANDKIT_LEDGER; default REPO/.randkit/ledger.sqlite)."
        ),
    ] = None,
    ledger_retention_days: Annotated[
        float, typer.Option(help="Forget predictions (not counts) older than this.")
    ] = 30.0,
    quiet: Annotated[bool, typer.Option(help="Log warnings only.")] = False,
) -> None:
    """Serve a model repository over KServe V2 and TensorFlow Serving REST."""
    import os

    require("serve", "randkit serve")
    from randkit.serve.run import serve_forever

    serve_forever(
        repository,
        host=host,
        port=port,
        grpc_port=grpc_port,
        token=token or os.environ.get("RANDKIT_TOKEN") or None,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_body_mb=max_body_mb,
        body_timeout_s=body_timeout_s,
        threads=threads,
        workers=workers,
        seed=seed,
        device=device,
        ledger=ledger or os.environ.get("RANDKIT_LEDGER") or None,
        ledger_retention_days=ledger_retention_days,
        quiet=quiet,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2; a full disk, a
    read-only folder or a cluster that does not start, one line and exit code 1."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message())  # a bare `randkit` shows the help
            return 0
        # Usage errors (unknown option, missing argument) as one line, like the others.
        print(f"error: {exc.format_message()}{_refused_value(exc)}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # last: the typed ones above come first
        # One place for storage faults from any command (and from its worker processes).
        cause = storage_error(exc)
        if cause is None:
            raise
        print(f"error: {storage_message(cause)}", file=sys.stderr)
        return 1
    return 0


def _refused_value(exc: BaseException) -> str:
    """The value a typed option refused: typer keeps it only on the pydantic error it wraps."""
    errors = getattr(exc.__cause__, "errors", None)
    return f", got {errors()[0].get('input')!r}" if callable(errors) else ""


def run() -> None:
    sys.exit(main())
