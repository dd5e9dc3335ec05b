"""The ``pyro-bc`` commands: run, compress, evaluate, info and export."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path

import pyro
import torch
from torch.utils.data import DataLoader

from .. import datasets as bc_data
from .. import distributed as bc_distributed
from .. import plots
from ..checkpoint import load_checkpoint
from ..compressed import CompressedNetwork
from ..compression import compress, compress_retrained, refit, retraining_pays
from ..datasets import RandomCropFlip, TensorBatches
from ..export import export_file
from ..files import write_atomically
from ..infer import evaluate, fit, linear_decay, pretrain
from ..models import MODELS, build, recipe
from ..predictive import network_metrics
from .options import (
    DATA_NAMES,
    DEFAULT_DATA,
    EVAL_BATCH_SIZE,
    INPUT_SHAPES,
    SYNTHETIC_SIZES,
    VALIDATION_IMAGES,
    CommandError,
)

# ---------------------------------------------------------------------------------------------
# Data


def load_data(source: str, dataset: str, *, download: bool = False, option: str = "--data"):
    """The images for a network made for ``dataset`` (``"mnist"`` or ``"cifar10"``) from
    ``--data`` ``source``: a name of :data:`DATA_NAMES` or a directory of that data set's files.

    Example::

        data = load_data("subset", "mnist")
    """
    kind = DATA_NAMES.get(source, dataset)
    if kind != dataset:
        raise CommandError(
            f"{option} {source} holds {kind} images, but the network takes {dataset} images "
            f"{'x'.join(map(str, INPUT_SHAPES[dataset]))}; choose {dataset} data"
        )
    try:
        if source == "synthetic-cifar10":
            return bc_data.synthetic_image_data(INPUT_SHAPES["cifar10"], **SYNTHETIC_SIZES)
        if dataset == "mnist":
            return bc_data.load_mnist(source, download=download)
        return bc_data.load_cifar10(None if source == "cifar10" else source, download=download)
    except FileNotFoundError as e:
        raise CommandError(f"{e} On the command line: {option} DIR, or --download") from None


def split_validation(data, validation: int | None):
    """Holds out the last ``validation`` training images (default: :data:`VALIDATION_IMAGES`,
    or a fifth of the training images when that is fewer); returns ``(data, held out)``.

    Example::

        data, held_out = split_validation(load_data("subset", "mnist"), None)  # 2,000
    """
    n = len(data.train_y)
    if validation is None:
        validation = min(VALIDATION_IMAGES, n // 5)
    if validation == 0:
        return data, 0
    if validation >= n:
        raise CommandError(
            f"--validation {validation}: the data has only {n} training images; hold out "
            "fewer (0 for none)"
        )
    return bc_data.train_validation_split(data, validation), validation


def _in_order(x, y):
    return TensorBatches(x, y, EVAL_BATCH_SIZE, shuffle=False)


# ---------------------------------------------------------------------------------------------
# Commands


def _network_options(width, model_name):
    """The network's keyword arguments: ``width`` for vgg16 (its default when None)."""
    if model_name != "vgg16":
        if width is not None:
            raise CommandError(f"--width applies to --model vgg16 only, not {model_name}")
        return {}
    default = inspect.signature(MODELS[model_name]).parameters["width"].default
    return {"width": default if width is None else width}


def _compress(guide, out, retraining=None, refitting=None, **kwargs):
    """The network to keep, saved with its report; the network chosen (on validation data where
    there are some) and the guide it was compressed from (a retrained thinned posterior where
    retraining paid), which the figures show. The kept network is the chosen one, refit where
    ``refitting`` says so."""
    try:
        chosen = compress(guide, **kwargs)
        if retraining and kwargs.get("validation") is not None:
            chosen, guide = _retrained_if_smaller(guide, chosen, retraining, kwargs)
        compressed = chosen
        if refitting:
            compressed, _ = refit(chosen, guide, test_loader=kwargs.get("test_loader"), **refitting)
            _print_refit(chosen.report, compressed.report)
    except ValueError as e:
        raise CommandError(str(e)) from e
    compressed.save(out / "model.bc")
    report = compressed.report
    write_atomically(out / "report.json", report.to_json(indent=2).encode())
    print(report)
    return compressed, chosen, guide


def _print_refit(chosen, refitted):
    line = f"refit on all {refitted.refit['examples']:,} training images"
    if refitted.test_error is not None:
        line += f": test error {chosen.test_error:.2%} as chosen, {refitted.test_error:.2%} refit"
    print(line)


def _retrained_if_smaller(guide, compressed, retraining, kwargs):
    """Retraining after pruning (``compress_retrained``) and its thinned guide where its network
    is smaller and within the same validation budget; otherwise ``compressed`` and ``guide``."""
    report = compressed.report
    retrained, thinned = compress_retrained(
        guide,
        retraining["train_loader"],
        validation=kwargs["validation"],
        max_error_increase=kwargs["max_error_increase"],
        prune_error_increase=retraining["prune_error_increase"],
        epochs=retraining["epochs"],
        lr=retraining["lr"],
        rounds=retraining["rounds"],
        seed=retraining["seed"],
        test_loader=kwargs.get("test_loader"),
    )
    allowed = report.dense_validation_error + kwargs["max_error_increase"]
    other = retrained.report
    smaller = retraining_pays(report, other, kwargs["max_error_increase"])
    print(
        f"retraining after pruning: {other.weights_kept:,} weights at validation error "
        f"{other.validation_error:.2%} against {report.weights_kept:,} at "
        f"{report.validation_error:.2%} without (allowed {allowed:.2%}): "
        + ("kept" if smaller else "not used")
    )
    return (retrained, thinned) if smaller else (compressed, guide)


def _retraining(train_loader, epochs, r, args, max_error_increase):
    """What ``_retrained_if_smaller`` needs: the recipe's, unless the options say otherwise."""
    looser = (
        r.prune_error_increase if args.prune_error_increase is None else args.prune_error_increase
    )
    if not isinstance(looser, list | tuple):
        looser = [looser]
    return {
        "train_loader": train_loader,
        "epochs": epochs,
        "lr": r.retrain_lr,
        "rounds": r.retrain_rounds if args.retrain_rounds is None else args.retrain_rounds,
        "prune_error_increase": [max(max_error_increase, value) for value in looser],
        "seed": getattr(args, "seed", 0),
    }


def _refitting(data, epochs, r, args, transform=None):
    """What ``refit`` needs beside the network: batches of every training image, the held-out
    ones included, and the recipe's retraining learning rate."""
    if not epochs:
        return None
    if data.validation_x is None:
        raise CommandError(
            "--refit-epochs gives the held-out images back to the network: hold some out with "
            "--validation N > 0, or pass --refit-epochs 0"
        )
    everything = TensorBatches(
        torch.cat([data.train_x, data.validation_x]),
        torch.cat([data.train_y, data.validation_y]),
        r.batch_size,
        shuffle=True,
        transform=transform,
    )
    return {
        "train_loader": everything,
        "epochs": epochs,
        "lr": r.retrain_lr,
        "seed": getattr(args, "seed", 0),
    }


def _figures(guide, compressed, out, history=None):
    plots.pruning_histograms(guide, compressed=compressed, path=out / "pruning-histograms.png")
    plots.weight_matrices(guide, compressed, path=out / "weights.png")
    plots.bits_per_layer(compressed, path=out / "bits.png")
    if history is not None and len(history):
        plots.training_curves(history, path=out / "training.png")


def _check_threshold_layers(thresholds, model, model_name):
    if not isinstance(thresholds, dict):
        return
    layers = [layer.site() for layer in model.bayesian_layers()]
    unknown = sorted(set(thresholds) - set(layers))
    if unknown:
        raise CommandError(
            f"--thresholds names layers {model_name} does not have: {', '.join(unknown)}; its "
            f"Bayesian layers are {', '.join(layers)}"
        )


def _check_resumable(checkpoint, asked):
    metadata = load_checkpoint(checkpoint).get("metadata") or {}
    different = {
        k: metadata[k] for k in asked if metadata.get(k) is not None and metadata[k] != asked[k]
    }
    if different:
        were = " ".join(f"--{k} {v}" for k, v in different.items())
        raise CommandError(
            f"--resume: {checkpoint} was trained with {were}; pass that, or another --out to "
            "start a new run"
        )


def _shardable(loader, augment):
    """The training images as a ``DataLoader``, which ``pyro_bc.distributed`` shards."""
    if augment is not None:
        raise CommandError(
            "several processes (torchrun) train without augmentation for now: use one process "
            "for CIFAR-10"
        )
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True)


def run(args):
    """``pyro-bc run``: pretrain, fit, compress, save, evaluate and draw, as the recipe says."""
    source = args.data or DEFAULT_DATA[recipe(args.model, args.prior).dataset]
    r = recipe(args.model, args.prior, data=source)
    options = _network_options(args.width, args.model)
    if args.max_error_increase is not None and args.validation == 0:
        raise CommandError("--max-error-increase needs validation images: --validation N > 0")
    retrain_epochs = r.retrain_epochs if args.retrain_epochs is None else args.retrain_epochs
    if args.retrain_rounds and not retrain_epochs:
        raise CommandError("--retrain-rounds needs --retrain-epochs (the recipe retrains none)")
    refit_epochs = r.refit_epochs if args.refit_epochs is None else args.refit_epochs
    out = args.out
    checkpoint = out / "checkpoint.pt"
    resuming = args.resume and checkpoint.exists()
    if resuming:
        _check_resumable(checkpoint, {"model": args.model, "prior": args.prior, **options})
    epochs = r.epochs if args.epochs is None else args.epochs
    pretrain_epochs = r.pretrain_epochs if args.pretrain_epochs is None else args.pretrain_epochs
    decay = r.decay_epochs if args.decay_epochs is None else args.decay_epochs
    batch_size = r.batch_size if args.batch_size is None else args.batch_size
    thresholds = r.thresholds if args.thresholds is None else args.thresholds

    # launched by torchrun: one process per device, DistributedDataParallel, process 0 reports
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = bc_distributed.setup() if distributed else args.device
    pyro.set_rng_seed(args.seed)
    # cuDNN's fastest convolution kernels add in any order: a resumed run would drift
    torch.backends.cudnn.deterministic = True
    data, held_out = split_validation(
        load_data(source, r.dataset, download=args.download), args.validation
    )
    if args.max_error_increase is not None and not held_out:
        raise CommandError("--max-error-increase needs validation images: --validation N > 0")
    if not held_out and args.refit_epochs is None:
        refit_epochs = 0  # the recipe's refit gives held-out images back: there are none
    augment = RandomCropFlip() if r.dataset == "cifar10" else None
    train_loader, test_loader = bc_data.train_test_loaders(
        data, batch_size=batch_size, transform=augment
    )
    network, model, guide = build(
        args.model, args.prior, len(data.train_y), device=device, **options
    )
    _check_threshold_layers(thresholds, model, args.model)
    deterministic_error = None  # the pretrained plain network's, where there is one
    if pretrain_epochs > 0 and not resuming:
        twin = network.deterministic(**options).to(device)
        twin = pretrain(twin, train_loader, epochs=pretrain_epochs, progress=not args.quiet)
        deterministic_error = network_metrics(twin, test_loader).error
        guide.init_from(twin, rescale=r.rescale)
    metadata = {
        "model": args.model,
        "prior": args.prior,
        "dataset_size": len(data.train_y),
        # a directory as an absolute path, so that compress finds it from any folder
        "data": source if source in DATA_NAMES else str(Path(source).expanduser().resolve()),
        "validation": held_out,
        **options,
    }
    with warnings.catch_warnings():
        # a NaN loss stops fit with TrainingDivergedError, one line: no warning before it
        warnings.filterwarnings("ignore", message="Encountered NaN")
        history = fit(
            model,
            guide,
            _shardable(train_loader, augment) if distributed else train_loader,
            epochs=epochs,
            # a resumed run keeps its checkpoint's rate unless --lr asks for another
            lr=r.lr if args.lr is None and not resuming else args.lr,
            lr_schedule=linear_decay(max(epochs - decay, 0), epochs) if decay > 0 else None,
            test_loader=test_loader,
            checkpoint=checkpoint,
            resume=args.resume,
            seed=args.seed,
            metadata=metadata,
            progress=not args.quiet,
            distributed=distributed,
        )
    processes = bc_distributed.world_size()
    if distributed:
        main_process = bc_distributed.rank() == 0
        bc_distributed.cleanup()
        if not main_process:
            return
    dense = evaluate(model, guide, test_loader, num_samples=args.mc_samples)
    # the recipe's error budget on the held-out images unless thresholds are given
    max_error_increase = args.max_error_increase
    if max_error_increase is None and args.thresholds is None and held_out:
        max_error_increase = r.max_error_increase  # None: the recipe's thresholds
    budget = {}
    if max_error_increase is not None:
        budget = {
            "validation": _in_order(data.validation_x, data.validation_y),
            "max_error_increase": max_error_increase,
        }
    retraining = None
    if retrain_epochs and budget:
        retraining = _retraining(train_loader, retrain_epochs, r, args, max_error_increase)
    compressed, chosen, compressed_from = _compress(
        guide,
        out,
        retraining=retraining,
        refitting=_refitting(data, refit_epochs, r, args, augment),
        thresholds=thresholds,
        test_loader=test_loader,
        calibration=_in_order(data.train_x, data.train_y),  # unaugmented
        **budget,
    )
    if args.figures:
        _figures(compressed_from, chosen, out, history)
    report = compressed.report
    summary = {
        **metadata,
        "device": str(device),
        "processes": processes,
        "epochs": len(history),
        "pretrain_epochs": 0 if resuming else pretrain_epochs,
        "lr": r.lr if args.lr is None else args.lr,
        "decay_epochs": decay,
        "batch_size": batch_size,
        "max_error_increase": max_error_increase,
        "retraining": report.retraining,
        "refit": report.refit,
        "test_error_deterministic": deterministic_error,
        "test_error_posterior_mean": dense["error"],
        f"test_error_mc{args.mc_samples}": dense.get("error_mc"),
        "test_error_compressed": report.test_error,
        "validation_error_compressed": report.validation_error,
        "architecture": report.architecture,
        "pruning_rate": report.pruning_rate,
        "precision_rate": report.precision_rate,
        "file_bytes": report.file_bytes,
        "file_rate": report.file_rate,
        "files": {
            "checkpoint": str(checkpoint),
            "compressed": str(out / "model.bc"),
            "report": str(out / "report.json"),
        },
    }
    write_atomically(out / "summary.json", json.dumps(summary, indent=2).encode())
    print(json.dumps(summary, indent=2))


def compress_checkpoint(args):
    """``pyro-bc compress``: compress a checkpoint written by ``run`` again, other choices."""
    metadata = dict(load_checkpoint(args.checkpoint).get("metadata") or {})
    model_name = args.model or metadata.get("model")
    prior_name = args.prior or metadata.get("prior")
    if not model_name or not prior_name:
        raise CommandError(
            f"{args.checkpoint} does not say which model and prior it holds; pass --model and "
            "--prior"
        )
    width = args.width
    if width is None and model_name == metadata.get("model"):
        width = metadata.get("width")
    options = _network_options(width, model_name)
    r = recipe(model_name, prior_name)
    source = args.data or metadata.get("data")
    if args.max_error_increase is not None and source is None:
        raise CommandError(
            f"--max-error-increase needs data: {args.checkpoint} does not record its data; "
            "pass --data"
        )
    _, model, guide = build(model_name, prior_name, metadata.get("dataset_size"), **options)
    _check_threshold_layers(args.thresholds, model, model_name)
    # checked against the guide (a checkpoint of another model is named in one line) and for
    # NaN or infinite values, which compress could not use
    state = load_checkpoint(args.checkpoint, guide)
    guide.load_state_dict(state["guide"])
    if state.get("model"):
        model.load_state_dict(state["model"])

    kwargs = {"thresholds": r.thresholds if args.thresholds is None else args.thresholds}
    if source is not None:
        validation = args.validation if args.validation is not None else metadata.get("validation")
        data, held_out = split_validation(
            load_data(str(source), r.dataset, download=args.download), validation
        )
        kwargs["test_loader"] = _in_order(data.test_x, data.test_y)
        kwargs["calibration"] = _in_order(data.train_x, data.train_y)
        if args.max_error_increase is not None:
            if not held_out:
                raise CommandError(
                    "--max-error-increase needs validation images: --validation N > 0"
                )
            kwargs["validation"] = _in_order(data.validation_x, data.validation_y)
            kwargs["max_error_increase"] = args.max_error_increase
            if args.retrain_epochs:
                loader = TensorBatches(data.train_x, data.train_y, r.batch_size, shuffle=True)
                kwargs["retraining"] = _retraining(
                    loader, args.retrain_epochs, r, args, args.max_error_increase
                )
    if args.retrain_epochs and "retraining" not in kwargs:
        raise CommandError("--retrain-epochs needs --max-error-increase and data")
    if args.refit_epochs:
        if source is None:
            raise CommandError(
                f"--refit-epochs needs data: {args.checkpoint} does not record its data; pass "
                "--data"
            )
        kwargs["refitting"] = _refitting(data, args.refit_epochs, r, args)
    if args.retrain_rounds and not args.retrain_epochs:
        raise CommandError("--retrain-rounds needs --retrain-epochs")
    out = args.out or args.checkpoint.parent
    _, chosen, compressed_from = _compress(guide, out, **kwargs)
    if args.figures:
        _figures(compressed_from, chosen, out)


def _dataset_of(network, path):
    shape = tuple(network.input_shape)
    for dataset, input_shape in INPUT_SHAPES.items():
        if shape == input_shape:
            return dataset
    raise CommandError(
        f"{path} takes inputs of shape {shape}; pyro-bc evaluates MNIST (1, 28, 28) and "
        "CIFAR-10 (3, 32, 32) networks"
    )


def evaluate_file(args):
    """``pyro-bc evaluate``: the test error of a ``.bc`` file."""
    network = CompressedNetwork.load(args.file)
    dataset = _dataset_of(network, args.file)
    source = args.data or DEFAULT_DATA[dataset]
    data = load_data(source, dataset, download=args.download)
    result = network.evaluate(_in_order(data.test_x, data.test_y))
    print(json.dumps({"file": str(args.file), "data": str(source), **result}, indent=2))


def info(args):
    """``pyro-bc info``: what a ``.bc`` file holds."""
    network = CompressedNetwork.load(args.file)
    weights = sum(m.weight.numel() for m in network.modules() if hasattr(m, "weight"))
    print(f"{args.file}: {args.file.stat().st_size} bytes, {weights} weights")
    print(f"input shape: {network.input_shape}")
    print(f"fraction bits per layer: {network.formats}")
    print(network)


def export(args):
    """``pyro-bc export``: a ``.bc`` file as ONNX and/or TorchScript."""
    if args.onnx is None and args.torchscript is None:
        raise CommandError("export: say what to write: --onnx PATH and/or --torchscript PATH")
    try:
        written = export_file(args.file, onnx=args.onnx, torchscript=args.torchscript)
    except ImportError as e:
        raise CommandError(str(e)) from e
    for path, size in written.items():
        print(f"{path}: {size} bytes")
