import math
from collections import OrderedDict

import matplotlib.colors
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pyro_bc
from pyro_bc import plots
from pyro_bc.compression import group_masks
from pyro_bc.infer import History
from pyro_bc.nn import BayesianConv2d, BayesianLinear, BayesianNetwork

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# conv1's filter 1 is pruned, which also removes fc1's inputs 9..17 (its 3x3 block after
# flatten); fc2's input 2 is pruned, which removes fc1's output row 2.
PRUNED = {"conv1": [1], "fc1": [0, 20, 30], "fc2": [2]}
FC1_PRUNED_COLUMNS = sorted({0, 20, 30} | set(range(9, 18)))


def _tiny():
    model = BayesianNetwork(
        OrderedDict(
            conv1=BayesianConv2d(1, 4, 3),
            relu1=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=BayesianLinear(36, 6),
            relu2=nn.ReLU(),
            fc2=BayesianLinear(6, 3),
        ),
        input_shape=(1, 8, 8),
    )
    guide = pyro_bc.StructuredGuide(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in guide.layers:
            (scale,) = layer.scale_factors
            scale.loc.copy_(1 + 0.1 * torch.randn(scale.loc.shape, generator=g))
            # log alpha near -12 (kept) or near +2 (pruned at the default threshold -3)
            scale.log_var.copy_(-12 + 0.5 * torch.randn(scale.loc.shape, generator=g))
            scale.log_var[PRUNED[layer.name]] = 2.0
            fan_in = math.prod(layer.weight.loc.shape[1:])
            layer.weight.loc.copy_(torch.randn(layer.weight.loc.shape, generator=g) / fan_in**0.5)
            layer.weight.log_var.uniform_(-16, -6, generator=g)
    return model, guide


def _loader(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=g)), batch_size=32)


def _pruned_overlay(ax):
    (image,) = [im for im in ax.get_images() if im.get_label() == plots.PRUNED_LABEL]
    return np.asarray(image.get_array())[..., 3] > 0


@pytest.mark.parametrize("thresholds", [None, "auto", {"fc1": 5.0, "fc2": "auto"}])
def test_group_masks_are_the_masks_compress_applies(thresholds):
    _, guide = _tiny()
    masks = group_masks(guide, thresholds)
    network = pyro_bc.compress(guide, thresholds, bits=None)
    for layer in network.report.layers:
        m = masks[layer.name]
        assert int(m.groups_kept.sum()) == layer.groups_kept
        assert int(m.below_threshold.sum()) == layer.groups_below_threshold
        assert (m.threshold, m.threshold_rule) == (layer.threshold, layer.threshold_rule)
        assert int(m.weight_kept.sum()) == layer.weights_kept
        # the thinned layer holds exactly the kept posterior means, in order
        thinned = network.get_submodule(layer.name).weight
        kept = m.weight_mean[m.out_keep][:, m.in_keep].float()
        assert torch.equal(thinned, kept)


def test_weight_matrices_grey_exactly_the_pruned_columns_and_rows(tmp_path):
    _, guide = _tiny()
    compressed = pyro_bc.compress(guide)
    path = tmp_path / "weights.png"
    fig = plots.weight_matrices(guide, compressed, path=path)
    assert isinstance(fig, Figure)
    conv1, fc1, fc2 = [ax for ax in fig.axes if ax.get_images()]
    report = {layer.name: layer for layer in compressed.report.layers}

    grey = _pruned_overlay(fc1)  # rows = outputs, columns = inputs (groups)
    assert grey.shape == (6, 36)
    assert np.flatnonzero(grey.all(axis=0)).tolist() == FC1_PRUNED_COLUMNS
    assert grey.all(axis=0).sum() == report["fc1"].groups - report["fc1"].groups_kept
    assert np.flatnonzero(grey.all(axis=1)).tolist() == [2]  # fc2's pruned input

    grey = _pruned_overlay(fc2)
    assert np.flatnonzero(grey.all(axis=0)).tolist() == [2]
    assert not grey.all(axis=1).any()

    grey = _pruned_overlay(conv1)  # one 3x3 kernel per filter, side by side with 1-px gaps
    assert grey.shape == (3, 4 * 4 - 1)
    assert np.flatnonzero(grey.all(axis=0)).tolist() == [4, 5, 6]  # filter 1's columns
    assert grey.sum() == 9

    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["weights.png"]  # no temporary file left


def test_weight_matrices_follow_the_thresholds_given():
    _, guide = _tiny()
    # at +5 nothing of fc1 is pruned by its own posterior: only conv1's block 9..17 goes
    fig = plots.weight_matrices(guide, thresholds={"fc1": 5.0}, layers=["fc1"], signed=True)
    (ax,) = [ax for ax in fig.axes if ax.get_images()]
    assert np.flatnonzero(_pruned_overlay(ax).all(axis=0)).tolist() == list(range(9, 18))
    assert ax.get_images()[0].get_cmap().name == "RdBu_r"


def test_pruning_histograms_count_every_group_and_draw_the_threshold(tmp_path):
    _, guide = _tiny()
    thresholds = {"conv1": -3.0, "fc1": -1.5, "fc2": -3.0}
    fig = plots.pruning_histograms(guide, thresholds, path=tmp_path / "h.png")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 3
    for ax, (groups, pruned, threshold) in zip(
        axes, [(4, 1, -3.0), (36, 3, -1.5), (6, 1, -3.0)], strict=True
    ):
        heights = [patch.get_height() for patch in ax.patches]
        assert sum(heights) == groups
        kept_bars, pruned_bars = ax.containers
        assert sum(p.get_height() for p in pruned_bars) == pruned
        (line,) = [line for line in ax.lines if line.get_label().startswith("threshold")]
        assert list(line.get_xdata()) == [threshold, threshold]
        # every kept bar lies left of the threshold, every pruned bar right of it
        assert all(p.get_x() < threshold for p in kept_bars if p.get_height())
        assert all(p.get_x() + p.get_width() > threshold for p in pruned_bars if p.get_height())
    assert "9 more removed" in axes[1].get_title()  # conv1's pruned filter
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG_MAGIC


def test_pruning_histograms_of_a_layer_that_prunes_nothing_draw_no_threshold(tmp_path):
    _, guide = _tiny()
    fig = plots.pruning_histograms(guide, {"conv1": math.inf, "fc1": -1.5, "fc2": -3.0})
    first = [ax for ax in fig.axes if ax.get_visible()][0]
    assert not [line for line in first.lines if line.get_label().startswith("threshold")]
    assert sum(p.get_height() for p in first.patches) == 4
    assert all(math.isfinite(x) for x in first.get_xlim())


def test_bits_per_layer_shows_the_report():
    _, guide = _tiny()
    compressed = pyro_bc.compress(guide)
    fig = plots.bits_per_layer(compressed)
    (ax,) = fig.axes
    t, paper, file = ax.containers
    layers = compressed.report.layers
    assert [b.get_height() for b in t] == [layer.frac_bits for layer in layers]
    assert [b.get_height() for b in paper] == [layer.paper_bits for layer in layers]
    assert [b.get_height() for b in file] == [layer.file_bits for layer in layers]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["conv1", "fc1", "fc2"]


def test_bits_histograms_mark_the_layer_bit_width():
    _, guide = _tiny()
    compressed = pyro_bc.compress(guide)
    fig = plots.bits_histograms(guide, compressed=compressed)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for ax, layer in zip(axes, compressed.report.layers, strict=True):
        assert sum(p.get_height() for p in ax.patches) == layer.weights_kept
        (line,) = [line for line in ax.lines if line.get_label().startswith("t =")]
        assert line.get_xdata()[0] == layer.frac_bits


def test_a_loaded_network_or_a_changed_guide_is_refused(tmp_path):
    _, guide = _tiny()
    compressed = pyro_bc.compress(guide)
    compressed.save(tmp_path / "net.bc")
    with pytest.raises(ValueError, match="report of compress"):
        plots.bits_per_layer(pyro_bc.load(tmp_path / "net.bc"))
    with pytest.raises(ValueError, match="not both"):
        plots.weight_matrices(guide, compressed, thresholds=-3.0)
    with torch.no_grad():
        guide.layers[1].scale_factors[0].log_var[5] = 2.0  # fc1 loses one more group
    with pytest.raises(ValueError, match="changed after compress"):
        plots.pruning_histograms(guide, compressed=compressed)
    with pytest.raises(ValueError, match="fc9"):
        plots.weight_matrices(guide, layers=["fc9"])


def test_training_curves_from_history_and_from_dicts(tmp_path):
    records = [
        {"epoch": e, "loss": 100.0 / e, "train_error": 0.5 / e, "test_error": 0.4 / e}
        for e in range(1, 5)
    ]
    fig = plots.training_curves(History(records))
    assert len(fig.axes) == 2
    loss_ax, error_ax = fig.axes
    assert list(loss_ax.lines[0].get_ydata()) == [100.0, 50.0, 100 / 3, 25.0]
    assert loss_ax.get_yscale() == "log"
    assert [line.get_label() for line in error_ax.lines] == ["train (sampled)", "test (means)"]
    np.testing.assert_allclose(error_ax.lines[1].get_ydata(), [40.0, 20.0, 40 / 3, 10.0])

    for e, record in enumerate(records, 1):
        record["kept_groups"] = {"fc1": 784 - 100 * e, "fc2": 300 - 50 * e}
    fig = plots.training_curves(records, path=tmp_path / "curves.png")
    kept_ax = fig.axes[2]
    assert [line.get_label() for line in kept_ax.lines] == ["fc1", "fc2"]
    assert list(kept_ax.lines[1].get_ydata()) == [250, 200, 150, 100]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no epochs"):
        plots.training_curves([])


def test_bit_sweep_and_error_against_bits():
    _, guide = _tiny()
    loader = _loader()
    sweep = plots.bit_sweep(guide, loader, bits=[0, 4, 12])
    assert sweep.bits == [0, 4, 12] and len(sweep.errors) == 3
    expected = pyro_bc.compress(guide, bits=4).evaluate(loader)["error"]
    assert sweep.errors[1] == expected
    auto = pyro_bc.compress(guide).report.layers
    assert sweep.auto_bits == {layer.name: layer.frac_bits for layer in auto}
    assert min(sweep.auto_bits.values()) <= sweep.auto_mean_bits <= max(sweep.auto_bits.values())
    assert "automatic" in str(sweep)
    fig = plots.error_vs_bits(sweep)
    (ax,) = fig.axes
    curve, star = ax.lines[0], ax.lines[-1]
    np.testing.assert_allclose(curve.get_ydata(), np.array(sweep.errors) * 100)
    assert star.get_xdata()[0] == sweep.auto_mean_bits


def test_figures_are_not_registered_with_pyplot():
    # Built with the object API, figures never enter pyplot's global list (no leaks in loops,
    # no windows), even when a user has pyplot imported.
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    _, guide = _tiny()
    plots.pruning_histograms(guide)
    plots.weight_matrices(guide)
    assert plt.get_fignums() == before


def test_tradeoff_draws_every_point_the_paper_and_the_choice(tmp_path):
    budget = [
        {"pruning_rate": 8.0, "precision_rate": 30.0, "test_error": 0.017},
        {"pruning_rate": 12.0, "precision_rate": 50.0, "test_error": 0.019},
    ]
    threshold = [{"pruning_rate": r, "precision_rate": 4 * r, "test_error": 0.02} for r in (2, 5)]
    paper = {"pruning_rate": 9.3, "precision_rate": None, "test_error": 0.018}
    fig = plots.tradeoff(
        {"budget": budget, "threshold": threshold},
        paper=paper,
        chosen=budget[1],
        path=tmp_path / "tradeoff.png",
    )
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    pruning, precision = fig.axes
    lines = {line.get_label(): line for line in pruning.get_lines()}
    assert list(lines["budget"].get_xdata()) == [8.0, 12.0]
    assert list(lines["budget"].get_ydata()) == pytest.approx([1.7, 1.9])
    assert lines["paper"].get_xdata()[0] == 9.3
    assert lines["chosen (validation)"].get_xdata()[0] == 12.0
    # the paper gives no rate after precision here: no star on that panel
    assert "paper" not in {line.get_label() for line in precision.get_lines()}


def test_error_vs_bits_marks_the_chance_plateau_with_a_tick():
    _, guide = _tiny()
    sweep = plots.bit_sweep(guide, _loader(), bits=[0, 4])
    assert sweep.num_classes == 3
    assert sweep.chance_error == pytest.approx(2 / 3)
    (ax,) = plots.error_vs_bits(sweep).axes
    chance = [line for line in ax.lines if line.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(200 / 3)
    assert any(tick == pytest.approx(200 / 3) for tick in ax.get_yticks())
    low, high = ax.get_ylim()
    assert low < 200 / 3 < high
    # a sweep without the number of classes (e.g. made by hand) has no chance line
    bare = plots.BitSweep(bits=[0, 4], errors=[0.5, 0.1], auto_mean_bits=4, auto_error=0.1)
    (ax,) = plots.error_vs_bits(bare).axes
    assert not [line for line in ax.lines if line.get_label().startswith("chance")]


def _colours(fig):
    (ax,) = [a for a in fig.axes if a.get_images()]
    (image,) = ax.get_images()
    return ax, image.to_rgba(image.get_array())[..., :3].reshape(-1, 3)


def test_kept_inputs_draws_a_layer_that_keeps_everything_in_the_kept_colour():
    model = BayesianNetwork(
        OrderedDict(flatten=nn.Flatten(), fc1=BayesianLinear(16, 3)), input_shape=(1, 4, 4)
    )
    guide = pyro_bc.StructuredGuide(model)  # at its initialisation every input is kept
    ax, colours = _colours(plots.kept_inputs(guide))
    kept = np.array(matplotlib.colors.to_rgb(plots.KEPT_COLOR))
    np.testing.assert_allclose(colours, np.tile(kept, (16, 1)), atol=1e-6)
    assert "16 of 16" in ax.get_title()


def test_kept_inputs_draws_pruned_inputs_in_grey():
    _, guide = _tiny()
    # fc1's 36 inputs are conv1's 4 filters x 3 x 3: filter 1 and inputs 0, 20, 30 pruned
    ax, colours = _colours(plots.kept_inputs(guide, layer="fc1", image_shape=(6, 6)))
    grey = np.array(plots.PRUNED_RGBA[:3])
    pruned = np.all(np.isclose(colours, grey, atol=1e-6), axis=1)
    assert sorted(np.flatnonzero(pruned)) == FC1_PRUNED_COLUMNS
    assert f"{36 - len(FC1_PRUNED_COLUMNS)} of 36" in ax.get_title()
    with pytest.raises(ValueError, match="conv1.*convolution"):
        plots.kept_inputs(guide)
    with pytest.raises(ValueError, match="fc1.*image_shape"):
        plots.kept_inputs(guide, layer="fc1")
