"""python -m search.report: one self-contained HTML file that explains a study.

Optimization history, validation accuracy against parameters with the budget
line and the Pareto front, the pruning curves, parameter importances, trial
counts by outcome, the top-10 architectures, and, given a final-training
result.json, its learning curves and confusion matrix. Plotly's JavaScript is
inlined once, so the file opens anywhere, offline.
"""

from __future__ import annotations

import contextlib
import html
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from models.complexity import count_activation_bytes, count_bytes
from search.cli import Parser, add_study_args, load_existing
from search.front import front_rows, pareto_front
from search.records import counts, outcome, ranked, trial_arch, write_atomic
from search.study import StudyError


def accuracy_vs_params(trials: list[FrozenTrial], budget: int | None) -> go.Figure:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    fig = go.Figure()
    fig.add_scatter(
        x=[t.user_attrs["params"] for t in done],
        y=[t.value for t in done],
        mode="markers",
        name="completed trial",
        text=[f"trial {t.number}" for t in done],
        marker={
            "size": 8,
            "color": [t.number for t in done],
            "colorscale": "Viridis",
            "showscale": True,
            "colorbar": {"title": "trial"},
        },
    )
    rejected = [t for t in trials if outcome(t) == "rejected" and "params" in t.user_attrs]
    if rejected:
        fig.add_scatter(
            x=[t.user_attrs["params"] for t in rejected],
            y=[0.0] * len(rejected),
            mode="markers",
            name="rejected (never built)",
            marker={"symbol": "x", "color": "crimson", "size": 6},
        )
    front = pareto_front(trials)
    if front:
        fig.add_scatter(
            x=[t.user_attrs["params"] for t in front],
            y=[t.value for t in front],
            mode="lines+markers",
            line={"shape": "hv", "color": "black"},
            name="Pareto front",
        )
    if budget:
        fig.add_vline(
            x=budget,
            line={"dash": "dash", "color": "crimson"},
            annotation_text=f"budget {budget:,}",
        )
    fig.update_layout(
        title="Validation accuracy against parameters",
        xaxis_title="parameters",
        yaxis_title="validation accuracy",
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
    )
    fig.update_xaxes(type="log")
    return fig


def state_counts(trials: list[FrozenTrial]) -> go.Figure:
    c = counts(trials)
    keys = ["complete", "pruned", "rejected", "failed", "running"]
    fig = go.Figure(
        go.Bar(
            x=keys,
            y=[c[k] for k in keys],
            text=[c[k] for k in keys],
            marker_color=["seagreen", "orange", "crimson", "gray", "steelblue"],
        )
    )
    fig.update_layout(
        title="Trials by outcome (rejected: over the budget, never built)", yaxis_title="trials"
    )
    return fig


def top_table(trials: list[FrozenTrial], n: int = 10) -> str:
    done = ranked(trials)[:n]
    head = (
        "<tr><th>trial</th><th>val acc</th><th>params</th><th>MACs</th><th>fp32 bytes</th>"
        "<th>fp32 activations</th><th>latency ms</th><th>stages "
        "(blocks x channels, kernel/skip)</th><th>pool</th><th>act</th><th>dropout</th>"
        "<th>optimizer</th><th>batch</th></tr>"
    )
    rows = []
    for t in done:
        arch = json.loads(t.user_attrs["arch"])
        stages = ", ".join(
            f"{s['blocks']}x{s['channels']} k{s['kernel']}/{s['skip_kernel']}"
            for s in arch["stages"]
        )
        tr = t.user_attrs.get("training", {})
        cells = [
            t.number,
            f"{t.value:.4f}",
            f"{t.user_attrs['params']:,}",
            f"{t.user_attrs['macs']:,}",
            f"{count_bytes(trial_arch(t)):,}",
            f"{count_activation_bytes(trial_arch(t)):,}",
            t.user_attrs.get("latency_ms", "-"),  # under a latency limit only
            stages,
            arch["pool"],
            arch["activation"],
            arch["dropout"],
            f"{tr.get('optimizer')} lr {tr.get('lr', 0):.3g}",
            tr.get("batch_size"),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def front_table(trials: list[FrozenTrial], study_name: str) -> str:
    """The front as a table: each row's sizes and the command that final-trains it."""
    rows = front_rows(pareto_front(trials), study_name)
    head = (
        "<tr><th>trial</th><th>params</th><th>MACs</th><th>fp32 bytes</th><th>fp16 bytes</th>"
        "<th>fp32 activations</th><th>latency ms</th><th>val acc</th><th>final training</th></tr>"
    )
    cells = [
        [
            r["trial"],
            f"{r['params']:,}",
            f"{r['macs']:,}",
            f"{r['bytes_fp32']:,}",
            f"{r['bytes_fp16']:,}",
            f"{r['activation_bytes_fp32']:,}",
            r.get("latency_ms", "-"),
            f"{r['validation']:.4f}",
            r["train"],
        ]
        for r in rows
    ]
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells
    )
    return f"<table>{head}{body}</table>"


def final_figures(result: dict[str, Any]) -> list[go.Figure]:
    """Learning curves of every seed's run, and the confusion matrix summed over them."""
    runs = result["runs"]
    curves = go.Figure()
    for r in runs:
        x = [e["epoch"] for e in r["epochs"]]
        seed = f"seed {r['seed']}"
        curves.add_scatter(x=x, y=[e["train_accuracy"] for e in r["epochs"]], name=f"train, {seed}")
        curves.add_scatter(x=x, y=[e["test_accuracy"] for e in r["epochs"]], name=f"test, {seed}")
        curves.add_scatter(
            x=x, y=[e["train_loss"] for e in r["epochs"]], name=f"train loss, {seed}", yaxis="y2"
        )
    each = ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in runs)
    curves.update_layout(
        title=f"Final training: {100 * result['test_accuracy']:.2f}% "
        f"+- {100 * result['test_accuracy_std']:.2f} test accuracy over {len(runs)} seed(s) "
        f"({each}), {result['params']:,} params, {result['seconds']:.0f} s on {result['device']}",
        xaxis_title="epoch",
        yaxis={"title": "accuracy"},
        yaxis2={"title": "loss", "overlaying": "y", "side": "right"},
    )
    total = [
        [sum(r["confusion_matrix"][i][j] for r in runs) for j in range(len(row))]
        for i, row in enumerate(runs[0]["confusion_matrix"])
    ]
    classes = result.get("classes") or [str(i) for i in range(len(total))]
    cm = go.Figure(
        go.Heatmap(z=total, x=classes, y=classes, colorscale="Blues", texttemplate="%{z}")
    )
    cm.update_layout(
        title=f"Confusion matrix (test split, summed over {len(runs)} seed(s))",
        xaxis_title="predicted",
        yaxis_title="true",
        yaxis={"autorange": "reversed"},
    )
    return [curves, cm]


def optuna_figures(study: optuna.Study) -> list[go.Figure]:
    """Optuna's own plots; the ones a small study cannot draw yet are left out."""
    vis = optuna.visualization
    figs = [vis.plot_optimization_history(study), vis.plot_intermediate_values(study)]
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) >= 2:
        # Fails when, e.g., every completed trial has the same parameters.
        with contextlib.suppress(ValueError, RuntimeError):
            figs.append(vis.plot_param_importances(study))
    figs[1].update_layout(
        title="Intermediate values (validation accuracy per epoch; pruned trials stop early)"
    )
    return figs


def build_report(study: optuna.Study, result: dict[str, Any] | None = None) -> str:
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    c = counts(trials)
    figs = optuna_figures(study)
    figs.insert(1, accuracy_vs_params(trials, attrs.get("budget")))
    figs.append(state_counts(trials))
    if result is not None:
        figs.extend(final_figures(result))
    parts = [
        f.to_html(
            full_html=False,
            include_plotlyjs="inline" if i == 0 else False,
            default_width="100%",
            default_height="480px",
        )
        for i, f in enumerate(figs)
    ]
    meta = ", ".join(
        f"{k} {v:,}" if isinstance(v, int) else f"{k} {html.escape(str(v))}"
        for k, v in attrs.items()
        if k != "command"
    )
    best = next(iter(ranked(trials)), None)
    best_line = (
        f"best: trial {best.number}, validation accuracy {best.value:.4f}, "
        f"{best.user_attrs['params']:,} params"
        if best
        else "no completed trial yet"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>budget-nas: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px}}
th{{background:#f3f3f3}}</style></head><body>
<h1>budget-nas study {html.escape(study.study_name)}</h1>
<p>{meta}</p>
<p>{c["trained"]} trained ({c["complete"]} complete, {c["pruned"]} pruned), {c["rejected"]}
rejected by the limits (never built), {c["failed"]} failed. {best_line}.</p>
<p><code>{html.escape(attrs.get("command", ""))}</code></p>
{"".join(f'<div class="plot">{p}</div>' for p in parts[: -2 if result else None])}
<h2>Accuracy/size front</h2>
<p>No other completed trial is smaller and at least as accurate. Every smaller budget's
answer is on it: <code>python -m search.export --budget 1M</code>.</p>
{front_table(trials, study.study_name)}
<h2>Top architectures</h2>{top_table(trials)}
{"".join(f'<div class="plot">{p}</div>' for p in (parts[-2:] if result else []))}
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m search.report", description=__doc__.split("\n")[0])
    add_study_args(ap)
    ap.add_argument("--result", help="a result.json of python -m search.train to include")
    ap.add_argument("-o", "--output", help="HTML file (default studies/NAME/report.html)")
    args = ap.parse_args(argv)
    # Importance estimates warn on small studies; the report shows them as they are.
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    try:
        study = load_existing(args)
        result = json.loads(Path(args.result).read_text()) if args.result else None
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read --result {args.result}: {e}", file=sys.stderr)
        return 2
    out = Path(args.output or f"studies/{args.study_name}/report.html")
    write_atomic(out, build_report(study, result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
