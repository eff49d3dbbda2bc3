"""Figures: where a plan spends its bits, how often each bit-width is picked, how training went.

matplotlib is optional (the ``plot`` extra), so it is imported inside the functions. Figures
are built with the object API on an Agg canvas rather than through ``pyplot``: nothing touches
the user's global backend or pyplot's figure registry, so plotting from a notebook, a
training loop or a thread leaves no open figures behind.

Every function writes one PNG (or any format matplotlib infers from the suffix), creates
the parent folders, and returns the written path.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError, DataError, MissingDependencyError
from .quant.bitwidths import ACTION_BITS

#: Bit-widths from lowest to highest: the order of the heatmap's colour levels.
_LEVELS: Tuple[float, ...] = tuple(sorted(ACTION_BITS))
_CMAP = "viridis"  # perceptually uniform and readable in greyscale and by colour-blind readers
_DPI = 150

EPISODE_COLUMNS = ("episode", "target_bits", "effective_bits", "storage_bits", "proxy_ppl", "return")


# ----- matplotlib plumbing ----------------------------------------------------------------
def _new_figure(width: float, height: float):
    """A Figure on its own Agg canvas (no pyplot state, see the module docstring)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError("Plots need matplotlib: pip install matplotlib") from exc
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    """Write the figure and drop its artists so the memory goes at once, not at the next GC."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    figure.clear()
    return path


# ----- input checks -----------------------------------------------------------------------
def _actions(plan, n_units: Optional[int] = None, what: str = "plan") -> np.ndarray:
    """A plan (sequence of action indices, or anything with ``.actions`` like a QuantPlan)
    as an int array, refusing wrong lengths and indices outside ``ACTION_BITS``."""
    raw = np.asarray(getattr(plan, "actions", plan))
    if raw.ndim != 1:
        raise DataError(f"A {what} is a flat list of action indices, one per unit; got shape {raw.shape}.")
    if raw.size and not np.issubdtype(raw.dtype, np.number):
        raise DataError(f"A {what} holds action indices (integers), got {raw.dtype} values.")
    if raw.size and not np.all(raw == np.round(raw)):
        raise DataError(f"A {what} holds action indices (integers 0..{len(ACTION_BITS) - 1}), not bit-widths.")
    actions = raw.astype(int)
    bad = actions[(actions < 0) | (actions >= len(ACTION_BITS))]
    if bad.size:
        raise DataError(
            f"The {what} has action {int(bad[0])}, outside 0..{len(ACTION_BITS) - 1} "
            f"(index into ACTION_BITS = {ACTION_BITS})."
        )
    if n_units is not None and actions.size != n_units:
        raise DataError(
            f"The {what} has {actions.size} actions but there are {n_units} units; a plan needs one "
            "action per unit, made for the same model and chunk size."
        )
    return actions


def _unit_list(units) -> list:
    """Units as a list; a QuantTable (or anything with ``.units``) is accepted too."""
    units = list(getattr(units, "units", units))
    if not units:
        raise DataError("No units to plot: pass the model's units (wq.find_units or table.units).")
    return units


# ----- allocation heatmap -----------------------------------------------------------------
def _module_names(units: Sequence) -> List[str]:
    """Module name inside its decoder layer, per unit: the last path component ("q_proj")
    unless two different modules of a layer share it, then the whole in-layer path
    ("self_attn.o_proj" vs "cross_attn.o_proj") so they are not merged into one column."""
    local = [_local_path(u) for u in units]
    short = [name.rsplit(".", 1)[-1] for name in local]
    owners: Dict[str, set] = {}
    for s, full in zip(short, local):
        owners.setdefault(s, set()).add(full)
    return [full if len(owners[s]) > 1 else s for s, full in zip(short, local)]


def _local_path(unit) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (path below the layer)."""
    parts = unit.module.split(".")
    layer = str(unit.layer)
    for i, part in enumerate(parts[:-1]):
        if part == layer:
            return ".".join(parts[i + 1 :])
    return unit.module


def _first_seen(values: Sequence) -> list:
    return list(dict.fromkeys(values))


def plot_allocation_heatmap(units, plan, path: str | Path, title: Optional[str] = None) -> Path:
    """Decoder layer (rows) by module (columns) heatmap of a plan's nominal bits per weight.

    Each module's column is split into its column chunks (one thin cell per unit, as wide as
    its share of the module's input columns), so the per-chunk choices stay visible. Colour
    levels are the seven bit-widths, evenly spaced so 1 / 1.58 / 2 bits are as distinct as
    8 / 16. The right axis gives each layer's mean bits per weight (weighted by ``n_weights``);
    the default title gives the model's.

    ``units``: list of :class:`~windquant_gym.quant.units.Unit` (or a QuantTable);
    ``plan``: one action index per unit (or a QuantPlan).
    """
    units = _unit_list(units)
    actions = _actions(plan, len(units))
    bits = np.array([ACTION_BITS[a] for a in actions], dtype=float)
    weights = np.array([u.n_weights for u in units], dtype=float)
    layers = sorted({u.layer for u in units})
    names = _module_names(units)
    modules = _first_seen(names)

    most_chunks = max(Counter((u.layer, name) for u, name in zip(units, names)).values())
    width, height = _heatmap_size(len(layers), len(modules), most_chunks)
    figure = _new_figure(width, height)
    ax = figure.add_subplot()
    image = _draw_chunks(ax, units, names, bits, layers, modules, edges=most_chunks <= 16)
    _label_heatmap(ax, layers, modules)
    _layer_means(ax, units, bits, weights, layers)
    # pad is a fraction of the subplot's width (0.775 of the figure's by default): keep
    # about 0.9 inch free for the layer-mean labels whatever the figure width.
    colorbar = figure.colorbar(image, ax=ax, pad=0.9 / (0.775 * width), fraction=0.04, aspect=max(10, len(layers)))
    colorbar.set_ticks(np.arange(len(_LEVELS)))
    colorbar.set_ticklabels([f"{b:g}" for b in _LEVELS])
    colorbar.set_label("bits per weight")
    mean = float((bits * weights).sum() / weights.sum())
    if title is None:
        title = f"Bit allocation: {mean:.3f} bits/weight on average, {len(units)} units"
    ax.set_title(title)
    return _save(figure, path)


def _heatmap_size(n_layers: int, n_modules: int, most_chunks: int) -> Tuple[float, float]:
    """Inches: about an inch per module column (wider when a module has many chunks, so each
    keeps a few pixels) and a quarter inch per layer row, within reason."""
    column = max(1.1, 0.08 * most_chunks)
    width = min(3.0 + column * max(n_modules, 2), 22.0)
    height = min(1.8 + 0.28 * max(n_layers, 3), 24.0)
    return width, height


def _draw_chunks(ax, units, names, bits, layers, modules, edges: bool = True):
    """One rectangle per unit; returns the mappable for the colourbar. ``edges=False`` drops
    the chunk outlines, which would cover cells only a few pixels wide."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Rectangle
    import matplotlib

    row = {layer: i for i, layer in enumerate(layers)}
    column = {name: j for j, name in enumerate(modules)}
    cells = [
        Rectangle((column[name] + u.col_start / u.in_features, row[u.layer] - 0.5), u.width / u.in_features, 1.0)
        for u, name in zip(units, names)
    ]
    colours = ListedColormap(matplotlib.colormaps[_CMAP](np.linspace(0.0, 1.0, len(_LEVELS))))
    norm = BoundaryNorm(np.arange(len(_LEVELS) + 1) - 0.5, len(_LEVELS))
    level = np.array([_LEVELS.index(b) for b in bits])
    # Thin white edges separate the chunks of a module; thicker lines below separate modules.
    collection = PatchCollection(cells, cmap=colours, norm=norm, edgecolor="white", linewidth=0.4 if edges else 0.0)
    collection.set_array(level)
    ax.add_collection(collection)
    for j in range(1, len(modules)):
        ax.axvline(j, color="white", linewidth=2.5)
    ax.set_facecolor("0.88")  # a module missing from some layer shows as grey, not as a bit-width
    ax.set_xlim(0, len(modules))
    ax.set_ylim(len(layers) - 0.5, -0.5)  # layer 0 on top, like the model's printout
    return collection


def _label_heatmap(ax, layers, modules) -> None:
    ax.set_xticks(np.arange(len(modules)) + 0.5)
    # Columns are about an inch wide, room for a short name; tilt only crowded or long labels.
    tilt = len(modules) > 9 or max(len(m) for m in modules) > 12
    ax.set_xticklabels(modules, rotation=25 if tilt else 0, ha="right" if tilt else "center", rotation_mode="anchor")
    ax.tick_params(axis="x", length=0)
    step = max(1, math.ceil(len(layers) / 40))  # keep layer labels from overlapping on deep models
    ax.set_yticks(np.arange(0, len(layers), step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_ylabel("decoder layer")
    ax.set_xlabel("module (split into its column chunks)")


def _layer_means(ax, units, bits, weights, layers) -> None:
    """Right-hand axis: each layer's mean bits per weight (weighted by unit size)."""
    row = {layer: i for i, layer in enumerate(layers)}
    total_bits = np.zeros(len(layers))
    total_weights = np.zeros(len(layers))
    for unit, b, w in zip(units, bits, weights):
        total_bits[row[unit.layer]] += b * w
        total_weights[row[unit.layer]] += w
    means = total_bits / np.maximum(total_weights, 1.0)
    twin = ax.twinx()
    twin.set_ylim(ax.get_ylim())
    step = max(1, math.ceil(len(layers) / 40))
    twin.set_yticks(np.arange(0, len(layers), step))
    twin.set_yticklabels([f"{means[i]:.2f}" for i in range(0, len(layers), step)])
    twin.set_ylabel("layer mean bits")


# ----- action distribution ----------------------------------------------------------------
def plot_action_distribution(plans, path: str | Path, labels: Optional[Sequence[str]] = None, units=None) -> Path:
    """Grouped bars of how often each bit-width is chosen, one bar colour per plan.

    Left panel: fraction of units per action. With ``units=`` (list of Unit or a QuantTable),
    a right panel gives the fraction of *weights*, which differs when modules have different
    sizes (an MLP chunk holds more weights than an attention chunk). ``plans`` is a list of
    plans (action-index lists or QuantPlans); a single plan is accepted too.
    """
    plans = _plan_list(plans)
    units = _unit_list(units) if units is not None else None
    n_units = len(units) if units is not None else None
    all_actions = [_actions(p, n_units, what=f"plan {i + 1}") for i, p in enumerate(plans)]
    labels = _labels(labels, len(plans))

    panels = [("fraction of units", [np.ones(len(a)) for a in all_actions])]
    if units is not None:
        sizes = np.array([u.n_weights for u in units], dtype=float)
        panels.append(("fraction of weights", [sizes] * len(plans)))
    figure = _new_figure(5.0 * len(panels) + 1.0, 3.6)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, weight_sets) in zip(axes, panels):
        fractions = [_fractions(a, w) for a, w in zip(all_actions, weight_sets)]
        _grouped_bars(ax, fractions, labels)
        ax.set_ylabel(ylabel)
    if len(plans) > 1:
        axes[0].legend(frameon=False, fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def _plan_list(plans) -> list:
    """``plans`` as a list of plans; one bare plan (a list of ints) or QuantPlan is wrapped."""
    if hasattr(plans, "actions"):
        return [plans]
    plans = list(plans)
    if not plans:
        raise DataError("No plans to plot: pass a list of plans (one action index per unit each).")
    if np.isscalar(plans[0]):
        return [plans]
    return plans


def _labels(labels, n_plans: int) -> List[str]:
    if labels is None:
        return [f"plan {i + 1}" for i in range(n_plans)]
    labels = [str(label) for label in labels]
    if len(labels) != n_plans:
        raise ConfigError(f"Got {len(labels)} labels for {n_plans} plans; give one label per plan.")
    return labels


def _fractions(actions: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Share of ``weights`` on each action, in ACTION_BITS order."""
    totals = np.bincount(actions, weights=weights, minlength=len(ACTION_BITS))
    return totals / max(float(totals.sum()), 1e-30)


def _grouped_bars(ax, fractions: List[np.ndarray], labels: List[str]) -> None:
    """One group per bit-width (16 ... 1, as the paper's figure 2), one bar per plan."""
    import matplotlib

    groups = np.arange(len(ACTION_BITS))
    width = 0.8 / len(fractions)
    # Plans are categories, not an ordered quantity: a qualitative palette.
    palette = matplotlib.colormaps["tab10"]
    for i, (fraction, label) in enumerate(zip(fractions, labels)):
        offset = (i - (len(fractions) - 1) / 2) * width
        ax.bar(groups + offset, fraction, width, label=label, color=palette(i % 10))
    ax.set_xticks(groups)
    ax.set_xticklabels([f"{b:g}" for b in ACTION_BITS])
    ax.set_xlabel("bits per weight")
    ax.set_ylim(0, 1.0 if max(float(f.max()) for f in fractions) > 0.6 else None)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


# ----- training curves --------------------------------------------------------------------
def plot_training_curves(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Three stacked panels against episode, from ``run_dir/episodes.csv``: proxy perplexity
    (log scale), effective and storage bits with the target budget as a dashed step line,
    and the episode return. Dotted vertical lines mark curriculum stage changes. Noisy
    curves (40+ episodes) get a moving average drawn over the raw points.

    Default ``path``: ``run_dir/training_curves.png``.
    """
    run_dir = Path(run_dir)
    columns = _read_episodes(run_dir / "episodes.csv")
    episode = columns["episode"]
    figure = _new_figure(8.0, 8.0)
    ax_ppl, ax_bits, ax_return = figure.subplots(3, 1, sharex=True)

    _noisy_line(ax_ppl, episode, columns["proxy_ppl"], "C0", "proxy perplexity")
    _log_scale(ax_ppl, columns["proxy_ppl"])
    ax_ppl.set_ylabel("proxy perplexity")

    _noisy_line(ax_bits, episode, columns["effective_bits"], "C1", "effective bits")
    ax_bits.plot(episode, columns["storage_bits"], color="C2", linewidth=0.8, alpha=0.7, label="storage bits")
    ax_bits.step(
        episode, columns["target_bits"], where="post", color="black", linestyle="--", linewidth=1.2, label="target bits"
    )
    ax_bits.set_ylabel("bits per weight")
    ax_bits.legend(frameon=False, fontsize="small", loc="best")

    _noisy_line(ax_return, episode, columns["return"], "C3", "return")
    ax_return.set_ylabel("episode return")
    ax_return.set_xlabel("episode")

    for ax in (ax_ppl, ax_bits, ax_return):
        _stage_changes(ax, episode, columns.get("stage"))
        ax.grid(alpha=0.3)
    ax_ppl.set_title(f"Training: {run_dir.name} ({len(episode)} episodes)")
    figure.tight_layout()
    return _save(figure, path if path is not None else run_dir / "training_curves.png")


# ----- the size/quality front ------------------------------------------------------------
_FRONT_STYLE = {"MaskablePPO": ("C0", "o", "-"), "MaskablePPO (returned)": ("C0", "s", ":"),
                "calibrated-knapsack": ("C1", "^", "-"), "knapsack": ("C7", "v", "--")}


def plot_front(source: str | Path, path: str | Path | None = None) -> Path:
    """Held-out perplexity (log scale) against storage bits per weight, one line per allocator,
    from a run folder's ``front.json`` (or that file, or any JSON whose ``rows`` hold
    ``allocator``, ``storage_bits`` and ``heldout_ppl``): the size/quality front a user picks a
    model from. Each point is labelled with its target's effective bits.

    Default ``path``: ``front.png`` beside the JSON."""
    source = Path(source)
    json_path = source / "front.json" if source.is_dir() else source
    if not json_path.is_file():
        raise DataError(f"{json_path} not found: a run over several targets writes front.json (windquant train "
                        "--preset cpu-front), or pass such a file.")
    try:
        rows = json.loads(json_path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{json_path} is not a front file (a JSON object with a 'rows' list): {exc}") from None
    figure = _new_figure(7.0, 4.8)
    ax = figure.subplots()
    allocators = _first_seen([r["allocator"] for r in rows])
    for k, name in enumerate(allocators):
        points = sorted((r["storage_bits"], r["heldout_ppl"], r["target_bits"]) for r in rows if r["allocator"] == name)
        colour, marker, line = _FRONT_STYLE.get(name, (f"C{(k + 2) % 10}", "D", "-"))
        evaluations = {r.get("evaluations") for r in rows if r["allocator"] == name}
        spent = max((e for e in evaluations if e is not None), default=None)
        cost = "" if spent is None else f", {spent:g} proxy pass{'' if spent == 1 else 'es'}"
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, marker=marker, linestyle=line,
                linewidth=1.2, markersize=4, label=f"{name}{cost}")
        if k == 0:
            for x, y, target in points:
                ax.annotate(f"{target:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 40, 60, 100 rather than 4 x 10^1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("storage bits per weight (packed file)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Size / quality front (labels: target effective bits)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(frameon=False, fontsize="small")
    figure.tight_layout()
    return _save(figure, path if path is not None else json_path.with_name("front.png"))


def _read_episodes(csv_path: Path) -> Dict[str, np.ndarray]:
    """Numeric columns of episodes.csv; blanks and non-numbers become NaN (the recorder
    writes "" for values an episode did not report)."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path} not found: point at a training run folder (windquant train --out DIR).")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        header = reader.fieldnames or []
    if not header:
        raise DataError(f"{csv_path} is empty: the run has not written its header yet.")
    missing = [c for c in EPISODE_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{csv_path} lacks column(s) {', '.join(missing)}; is it an episodes.csv from windquant train?")
    if not rows:
        raise DataError(f"{csv_path} has no episodes yet: plot once training has finished an episode.")
    columns = {name: np.array([_number(row.get(name)) for row in rows]) for name in header}
    # A row without an episode number is still an episode: fall back to its position.
    positions = np.arange(1, len(rows) + 1, dtype=float)
    columns["episode"] = np.where(np.isfinite(columns["episode"]), columns["episode"], positions)
    return columns


def _number(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")  # inf would break the log axis


def _noisy_line(ax, x: np.ndarray, y: np.ndarray, colour: str, label: str) -> None:
    """Raw values, plus a moving average when there are enough episodes to be noisy."""
    window = len(y) // 20 if len(y) >= 40 else 1
    if window <= 1:
        ax.plot(x, y, color=colour, linewidth=1.2, marker="." if len(y) < 40 else None, label=label)
        return
    ax.plot(x, y, color=colour, linewidth=0.6, alpha=0.35, label=label)
    ax.plot(x, _moving_average(y, window), color=colour, linewidth=1.6, label=f"{label} (mean of {window})")


def _log_scale(ax, values: np.ndarray) -> None:
    """Log y axis labelled with plain numbers so perplexities read directly; left linear
    when nothing is positive (a log axis of no data only warns)."""
    from matplotlib.ticker import LogFormatter, MaxNLocator, NullFormatter, StrMethodFormatter

    positive = values[values > 0]
    if positive.size == 0:
        return
    ax.set_yscale("log")
    if positive.max() / positive.min() < 10:
        # Within one decade the log locator finds one or two ticks: place evenly spaced ones.
        ax.yaxis.set_major_locator(MaxNLocator(6))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` episodes, ignoring NaN (episodes that did not report)."""
    finite = np.isfinite(y)
    sums = np.cumsum(np.where(finite, y, 0.0))
    counts = np.cumsum(finite)
    sums[window:] = sums[window:] - sums[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _stage_changes(ax, episode: np.ndarray, stage: Optional[np.ndarray]) -> None:
    if stage is None or len(stage) < 2:
        return
    changed = np.flatnonzero(np.diff(stage) != 0) + 1
    for i in changed:
        if np.isfinite(stage[i]):
            ax.axvline(episode[i], color="0.5", linestyle=":", linewidth=1.0)


# ----- saved plans ------------------------------------------------------------------------
def plot_plan_file(plan_json: str | Path, table, path: str | Path, stored: bool = False) -> Path:
    """Heatmap of a saved QuantPlan (``QuantPlan.save`` JSON) on the units of ``table``.

    The plan must belong to the table (same fingerprint and quant config), else
    ``TableMismatchError``: the units would not line up. ``stored=True`` draws the action
    actually stored after fallback (``table.stored_action``) instead of the requested one.
    """
    from .plan import QuantPlan

    plan_json = Path(plan_json)
    if not plan_json.is_file():
        raise DataError(f"{plan_json} not found: pass a plan saved by QuantPlan.save (e.g. best_plan_<bits>.json).")
    try:
        plan = QuantPlan.load(plan_json)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{plan_json} is not a QuantPlan JSON file ({exc!r}).") from exc
    plan.check(table)
    actions = np.asarray(plan.actions, dtype=int)
    if stored:
        actions = table.stored_action[np.arange(len(actions)), actions]
    bits = table.plan_bits(plan.actions)
    name = plan.model or plan_json.stem
    title = f"{name}: {bits['effective_bits']:.3f} effective bits/weight"
    if isinstance(plan.metrics.get("proxy_ppl"), (int, float)):
        title += f", proxy perplexity {plan.metrics['proxy_ppl']:.2f}"
    if stored:
        title += " (stored actions)"
    return plot_allocation_heatmap(table.units, actions, path, title=title)
