"""Compress's per-layer arguments: one value for every layer, or a dict by layer name."""

from __future__ import annotations


def per_layer(argument, names: list, what: str, scalars: tuple, missing) -> dict:
    """``{layer: value}`` for ``names`` from ``argument``: ``None`` or a value of a ``scalars``
    type for every layer, or a dict by layer name (layers it leaves out get ``missing``).

    :raises ValueError: for a dict naming a layer the model does not have, or another type.

    Example::

        per_layer({"fc1": 4}, ["fc1", "fc2"], "bits", (int, str), "auto")
        # {'fc1': 4, 'fc2': 'auto'}
    """
    if argument is None or isinstance(argument, scalars):
        return dict.fromkeys(names, argument)
    if not isinstance(argument, dict):
        raise ValueError(
            f"compress: {what} must be one value for every layer or a dict {{layer: value}}; "
            f"got {type(argument).__name__}"
        )
    unknown = set(argument) - set(names)
    if unknown:
        raise ValueError(
            f"compress: {what} name layers the model does not have: {sorted(unknown)}; its "
            f"Bayesian layers are {names}"
        )
    return {name: argument.get(name, missing) for name in names}
