"""Figures from hand-made units, plans and episode logs (no model needed)."""

import builtins
import csv

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402

import windquant_gym as wq  # noqa: E402
from windquant_gym import plots  # noqa: E402
from windquant_gym.plan import QuantPlan  # noqa: E402
from windquant_gym.quant.bitwidths import N_ACTIONS  # noqa: E402
from windquant_gym.quant.table import QuantTable  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (local path, out_features, in_features): 2 chunks of 32 columns each, the last one narrower.
MODULES = (("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 32, 64), ("mlp.down_proj", 64, 48))
CHUNK = 32


def make_units(n_layers=3):
    units = []
    for layer in range(n_layers):
        for local, out_features, in_features in MODULES:
            for start in range(0, in_features, CHUNK):
                units.append(
                    wq.Unit(
                        index=len(units), layer=layer, module=f"model.layers.{layer}.{local}",
                        col_start=start, col_end=min(start + CHUNK, in_features),
                        out_features=out_features, in_features=in_features,
                        is_attention="attn" in local, is_mlp="mlp" in local,
                    )
                )
    return units


def make_table(units):
    """A real QuantTable with bit accounting only (no fitted codes): enough for plans."""
    n = len(units)
    stored = np.tile(np.arange(N_ACTIONS), (n, 1))
    stored[0, 6] = 5  # one fallback: 1 bit requested, 1.58 stored
    zeros, ones = np.zeros((n, N_ACTIONS)), np.ones(n)
    return QuantTable(
        units=units, config=wq.QuantConfig(chunk_size=CHUNK), fingerprint="fake-table", codes={}, scales={},
        outlier_index={}, outlier_codes={}, outlier_scales={},
        fit_error_plain=zeros, fit_error_act=zeros, fit_error_output=zeros, energy_plain=ones, energy_act=ones,
        energy_output=ones, stored_action=stored,
    )


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_MAGIC)


def write_episodes(run_dir, n=60, rows=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    header = ["episode", "stage", "target_bits", "effective_bits", "storage_bits", "proxy_ppl", "ppl_ratio",
              "return", "lagrange_lambda", "fallbacks", "episode_seconds"]
    rng = np.random.default_rng(0)
    with (run_dir / "episodes.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(n if rows is None else 0):
            target = 4.0 if i < n // 2 else 3.0
            stage = 0 if i < n // 2 else 1
            bits = target - 0.2 + 0.1 * rng.standard_normal()
            ppl = 30 * np.exp(-i / n) + rng.random() if i != 5 else ""  # one blank value, as the recorder writes
            writer.writerow([i + 1, stage, target, bits, bits + 0.3, ppl, 1.2, -1 + i / n, 0.1, 0, 0.5])
        for row in rows or []:
            writer.writerow(row)
    return run_dir


def test_allocation_heatmap_png(tmp_path):
    units = make_units()
    plan = [(u.index * 3) % N_ACTIONS for u in units]
    path = plots.plot_allocation_heatmap(units, plan, tmp_path / "figs" / "heatmap.png")
    assert path == tmp_path / "figs" / "heatmap.png"
    assert_png(path)
    height, width = matplotlib.image.imread(path).shape[:2]
    assert 300 < width < 4000 and 200 < height < 4000
    assert width > height  # 3 module columns and a colourbar, only 3 layer rows


def test_allocation_heatmap_accepts_table_and_quantplan(tmp_path):
    units = make_units(2)
    table = make_table(units)
    plan = QuantPlan.from_table(table, [2] * len(units))
    assert_png(plots.plot_allocation_heatmap(table, plan, tmp_path / "h.png", title="custom"))


def test_module_names_are_short_unless_ambiguous():
    units = make_units(1)
    assert plots._first_seen(plots._module_names(units)) == ["q_proj", "k_proj", "down_proj"]
    clash = [
        wq.Unit(0, 0, "model.layers.0.self_attn.o_proj", 0, 8, 8, 8, True, False),
        wq.Unit(1, 0, "model.layers.0.cross_attn.o_proj", 0, 8, 8, 8, True, False),
    ]
    assert plots._module_names(clash) == ["self_attn.o_proj", "cross_attn.o_proj"]


def test_action_distribution_png(tmp_path):
    units = make_units()
    plans = [[2] * len(units), [(i % N_ACTIONS) for i in range(len(units))]]
    one = plots.plot_action_distribution(plans, tmp_path / "units.png", labels=["4 bit", "mixed"])
    both = plots.plot_action_distribution(plans, tmp_path / "weights.png", units=units)
    single = plots.plot_action_distribution(plans[0], tmp_path / "single.png")
    for path in (one, both, single):
        assert_png(path)
    # The weights panel makes the figure wider.
    assert matplotlib.image.imread(both).shape[1] > matplotlib.image.imread(one).shape[1]


def test_fractions_by_units_and_weights():
    actions = np.array([0, 0, 6])
    assert np.allclose(plots._fractions(actions, np.ones(3)), [2 / 3, 0, 0, 0, 0, 0, 1 / 3])
    assert np.allclose(plots._fractions(actions, np.array([1.0, 1.0, 2.0])), [0.5, 0, 0, 0, 0, 0, 0.5])


def test_training_curves_png(tmp_path):
    run = write_episodes(tmp_path / "run")
    path = plots.plot_training_curves(run)
    assert path == run / "training_curves.png"
    assert_png(path)
    short = write_episodes(tmp_path / "short", n=5)  # few episodes: no moving average
    assert_png(plots.plot_training_curves(short, tmp_path / "out" / "curves.png"))
    # Perplexity over decades (log ticks), an infinite and a missing value, one stage.
    rows = [[i + 1, 0, 4, 3.9, 4.2, ppl, "", ret, "", 0, 1.0]
            for i, (ppl, ret) in enumerate([(5000, -3), ("inf", "nan"), (300, -2), (40, ""), (25, -1)])]
    wide = write_episodes(tmp_path / "wide", rows=rows)
    assert_png(plots.plot_training_curves(wide))


def test_plan_file_png(tmp_path):
    units = make_units()
    table = make_table(units)
    plan = QuantPlan.from_table(table, [6] * len(units), "fake-model", proxy_ppl=12.5)
    saved = plan.save(tmp_path / "best_plan_1.json")
    assert_png(plots.plot_plan_file(saved, table, tmp_path / "plan.png"))
    assert_png(plots.plot_plan_file(saved, table, tmp_path / "stored.png", stored=True))


def test_plan_file_refuses_other_table(tmp_path):
    units = make_units()
    plan = QuantPlan.from_table(make_table(units), [1] * len(units))
    saved = plan.save(tmp_path / "plan.json")
    other = make_table(make_units())
    object.__setattr__(other, "fingerprint", "another-table")
    with pytest.raises(wq.TableMismatchError):
        plots.plot_plan_file(saved, other, tmp_path / "x.png")
    with pytest.raises(wq.DataError, match="not found"):
        plots.plot_plan_file(tmp_path / "missing.json", other, tmp_path / "x.png")


def test_plan_length_and_action_errors(tmp_path):
    units = make_units()
    with pytest.raises(wq.DataError, match="one action per unit"):
        plots.plot_allocation_heatmap(units, [1] * (len(units) - 1), tmp_path / "x.png")
    with pytest.raises(wq.DataError, match="outside"):
        plots.plot_allocation_heatmap(units, [7] * len(units), tmp_path / "x.png")
    with pytest.raises(wq.DataError, match="one action per unit"):
        plots.plot_action_distribution([[1] * 3], tmp_path / "x.png", units=units)
    with pytest.raises(wq.ConfigError, match="labels"):
        plots.plot_action_distribution([[1] * 3], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(wq.DataError):
        plots.plot_action_distribution([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_episodes_csv_errors(tmp_path):
    with pytest.raises(wq.DataError, match="not found"):
        plots.plot_training_curves(tmp_path / "nowhere")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "episodes.csv").write_text("")
    with pytest.raises(wq.DataError, match="empty"):
        plots.plot_training_curves(tmp_path / "blank")
    header_only = write_episodes(tmp_path / "header_only", rows=[])
    with pytest.raises(wq.DataError, match="no episodes"):
        plots.plot_training_curves(header_only)


def test_missing_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    units = make_units(1)
    with pytest.raises(wq.MissingDependencyError, match="pip install matplotlib"):
        plots.plot_allocation_heatmap(units, [0] * len(units), tmp_path / "x.png")
    with pytest.raises(wq.MissingDependencyError, match="pip install matplotlib"):
        plots.plot_training_curves(write_episodes(tmp_path / "run", n=3))
