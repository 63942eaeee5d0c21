"""Test-time-adaptation baselines of AnoRefiner Table 1: TIPI, SAR and DeYO on a zero-shot backend.

The paper (Sec. 4, Baselines) adapts "the BatchNorm/LayerNorm parameters of corresponding backbone
blocks" group by group (the PGT groups), with "model uncertainty (e.g. entropy and PLPD)" as the
loss. ``shared/specs/tta.md`` Part A gives the official methods and one mapping onto zero-shot
anomaly detection (A.5), implemented here:

* :mod:`.common` - the :class:`~.common.TTABackend` protocol, 2-class entropy/KL, LN-affine selection;
* :mod:`.sar`, :mod:`.deyo`, :mod:`.tipi` - one group step of each method;
* :mod:`.adapt` - the per-category loop (:func:`~.adapt.adapt_category`, :class:`~.adapt.TTAConfig`);
* :mod:`.musc` - MuSc as a TTA backend (differentiable mutual scoring);
* :mod:`.april_gan` - APRIL-GAN as a TTA backend (its own 2-class token and image logits);
* :mod:`.vcp_clip` - VCP-CLIP as a TTA backend (its two branches' 2-class token logits).

A new backend plugs in by providing the protocol: either its zero-shot backend object has a
``tta_backend(backbone, seed, autocast_dtype)`` method returning one, or it is added to
:func:`build_tta_backend`; either way its registry entry says ``tta=True``
(:data:`anorefiner.zsad.registry.TTA_TYPES`, the choices of ``anorefiner tta --base-type``).
"""

from __future__ import annotations

from .adapt import METHODS, TTAConfig, adapt_category


def build_tta_backend(base_type: str, base_name: str, base_options: dict, backbone, config: TTAConfig,
                      seed: int, device):
    """The TTA backend of zero-shot backend ``base_name`` (type ``base_type``) over ``backbone``."""
    from ..config import from_dict

    dtype = config.autocast_dtype(device)
    if base_type == "musc":
        from ..zsad.musc.backend import MuscConfig
        from .musc import MuscTTA

        musc = from_dict(MuscConfig, base_options, f"backends.{base_name}.options")
        return MuscTTA(backbone, musc, config.musc, seed=seed, autocast_dtype=dtype, name=base_name)
    from ..zsad import PRESETS, get_backend

    key = base_name if PRESETS.get(base_name, (None,))[0] == base_type else base_type
    zsad = get_backend(key, base_options, backbone=backbone, seed=seed)
    if base_type == "april_gan":
        from .april_gan import AprilGanTTA

        return AprilGanTTA(zsad, autocast_dtype=dtype, name=base_name)
    if base_type == "vcp_clip":
        from .vcp_clip import VcpClipTTA

        return VcpClipTTA(zsad, autocast_dtype=dtype, name=base_name)
    if hasattr(zsad, "tta_backend"):
        return zsad.tta_backend(backbone, seed=seed, autocast_dtype=dtype)
    raise ValueError(
        f"backend {base_name!r} (type {base_type!r}) does not provide the test-time-adaptation interface "
        "(anorefiner.tta.common.TTABackend via a tta_backend() method)"
    )


def check_config(config: dict) -> None:
    """Workflow-load check of the ``tta`` section and of every ``backends.<name>`` of type ``tta``:
    a known method, a configured zero-shot ``base`` on the same backbone, and options that
    :class:`TTAConfig` accepts. Raises ``ConfigError`` naming the key."""
    import copy

    from ..config import ConfigError, from_dict

    section = config.get("tta") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"tta must be a mapping, got {section!r}")
    backends = config.get("backends") or {}
    for name, cfg in backends.items():
        if not isinstance(cfg, dict) or cfg.get("type") != "tta":
            continue
        if cfg.get("method") not in METHODS:
            raise ConfigError(f"backends.{name}.method is {cfg.get('method')!r}; expected one of {', '.join(METHODS)}")
        base = cfg.get("base")
        if base not in backends or (backends[base] or {}).get("type") == "tta":
            raise ConfigError(f"backends.{name}.base is {base!r}; expected a zero-shot backend under backends")
        if backends[base].get("backbone") != cfg.get("backbone"):
            raise ConfigError(f"backends.{name}.backbone {cfg.get('backbone')!r} differs from its base "
                              f"{base!r}'s {backends[base].get('backbone')!r}")
        options = cfg.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"backends.{name}.options must be a mapping, got {options!r}")
        merged = copy.deepcopy(section)
        for key, value in options.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        try:
            from_dict(TTAConfig, merged, f"tta (backends.{name})").validate()
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"tta (backends.{name}): {err}") from err


__all__ = ["METHODS", "TTAConfig", "adapt_category", "build_tta_backend", "check_config"]
