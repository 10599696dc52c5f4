"""dpolens: the mechanistic study of preference alignment on any Hugging Face causal LM."""

__version__ = "0.1.0"

__all__ = ["load_model", "LoadedModel", "__version__"]


def __getattr__(name):
    # Lazy: `import dpolens` stays cheap and touches no network.
    if name in ("load_model", "LoadedModel"):
        from dpolens.model import loading

        return getattr(loading, name)
    raise AttributeError(name)
